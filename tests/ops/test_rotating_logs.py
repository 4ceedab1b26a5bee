"""Every log `pneumo run` writes is rotated by size (issue 23 row 6: 600 KB of 6-byte unknown-PDU
headers added 6.5 MB to node.log, and no log was ever rotated)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from core.logsafe import OutputLog
from core.settings import Settings
from ops.supervisor import Child, _failure_reason, _start, output_log


def _sizes(home: Path, name: str) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(home.glob(f"{name}.log*"))}


def test_a_flooding_child_fills_at_most_its_rotated_files(tmp_path: Path) -> None:
    lines = 200_000  # 4.2 MB of output
    child = Child("flood", [sys.executable, "-c",
                            f"import sys\nfor n in range({lines}): sys.stdout.write(f'{{n:019d}}\\n')\n"
                            "sys.stderr.write('the last word\\n')\n"])
    child.log = OutputLog(tmp_path / "flood.log", max_bytes=1024 * 1024, backups=2)
    _start(child, dict(os.environ), tmp_path)
    child.process.wait(timeout=60)
    assert child.log.drain(timeout_s=60)[-1] == "the last word"
    sizes = _sizes(tmp_path, "flood")
    assert set(sizes) == {"flood.log", "flood.log.1", "flood.log.2"}
    assert all(size <= 1024 * 1024 for size in sizes.values())
    newest = (tmp_path / "flood.log").read_text().splitlines()
    assert newest[-1] == "the last word" and newest[-2] == f"{lines - 1:019d}"  # nothing lost at the end
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in tmp_path.glob("flood.log*"))


def test_the_reason_a_child_cannot_start_comes_from_its_output(tmp_path: Path) -> None:
    child = Child("failing", [sys.executable, "-c", "import sys\nprint('starting')\n"
                              "sys.exit('error: cannot listen on 127.0.0.1:1 (PNEUMO_PORT): no')"])
    _start(child, dict(os.environ), tmp_path)
    child.process.wait(timeout=30)
    assert _failure_reason(child, tmp_path) == "cannot listen on 127.0.0.1:1 (PNEUMO_PORT): no"
    assert "starting" in (tmp_path / "failing.log").read_text()


def test_the_sizes_are_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, log_max_mb=0.5, log_backups=3)
    handler = output_log(settings, "node").handler
    assert (handler.maxBytes, handler.backupCount) == (512 * 1024, 3)
    assert handler.baseFilename == str(tmp_path / "node.log")
