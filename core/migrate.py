"""`pneumo db upgrade`: Alembic migrations, run programmatically on the configured database.

The revisions and alembic.ini are package data of `core` (core/migrations/, core/alembic.ini), so
an installed wheel migrates from any directory; nothing is looked up beside a checkout.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config


def upgrade(url: str, revision: str = "head") -> None:
    package = resources.files("core")
    # as_file: a real folder even if the package were ever imported from a zip.
    with resources.as_file(package / "alembic.ini") as ini, \
            resources.as_file(package / "migrations") as scripts:
        config = Config(str(ini))
        config.set_main_option("script_location", str(scripts))
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        command.upgrade(config, revision)
