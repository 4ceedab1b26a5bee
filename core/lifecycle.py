"""How a process started by `pneumo run` tells its supervisor it listens, or that restarting it cannot help.

In the ground so the node (dicom_node) and the dashboard (ops) say it the same way without the
node importing the supervisor.
"""

from __future__ import annotations

import os

# A child exits with one of these when restarting it cannot help: 2 is a usage error or invalid
# settings (typer, `pneumo` commands), 78 (EX_CONFIG) a port it cannot listen on.
EXIT_USAGE = 2
EXIT_CANNOT_START = 78
PERMANENT_EXIT_CODES = frozenset({EXIT_USAGE, EXIT_CANNOT_START})
READY_ENV = "PNEUMO_READY_FD"


def notify_ready() -> None:
    """Tell `pneumo run` this child is listening (no-op when not started by it)."""
    descriptor = os.environ.pop(READY_ENV, None)
    if descriptor:
        try:
            os.write(int(descriptor), b"ready\n")
            os.close(int(descriptor))
        except OSError:
            pass
