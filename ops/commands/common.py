"""What every `pneumo` command shares: its defaults, its settings and logging, the Keras backend
check, and the one decorator that turns a known error into one line on stderr and an exit status."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import typer

from core.lifecycle import EXIT_CANNOT_START
from core.settings import Settings

# Training data and backbone weights of a development machine: `../shared` from the checkout's
# root, where commands are run (relative like PNEUMO_HOME's `var`; never found from this file,
# which an installed product keeps in site-packages). --data and --weights say otherwise.
DEFAULT_DATA = Path("..") / "shared" / "data" / "chest_xray"
DEFAULT_WEIGHTS = (
    Path("..") / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)
MODELS_DIR_HELP = "Registry folder [default: PNEUMO_MODELS_DIR, else ./models]"
SITE_DATA_HELP = ("Site folder: labels.csv (file, label, optional patient_id, age, view) and its "
                  "JPEG/PNG/DICOM images, or NORMAL/ and PNEUMONIA/ folders")

# The errors a command reports as one line `error: ...` and the exit status each gives. Named by
# where they are defined, not imported: importing training.site would load Keras for every command.
EXIT_STATUS = {
    "core.registry.RegistryError": 2,  # CardError too
    "core.settings.SettingsError": 2,
    "core.tls.TLSConfigError": 2,
    "serving.pixelcheck.ScopeError": 2,
    "training.site.SiteDataError": 2,
    "ops.status.DatabaseNotFound": 1,
    "ops.status.BrokerDown": 1,
    "dicom_node.scp.CannotListen": EXIT_CANNOT_START,
    "ops.dashboard.CannotListen": EXIT_CANNOT_START,
}
USAGE_ERROR = 2  # a built-in error a command names (a wrong --data folder, no images)

Command = TypeVar("Command", bound=Callable[..., object])


def exit_status(error: Exception, builtin: tuple[type[Exception], ...] = ()) -> int | None:
    """The exit status of a known error (EXIT_STATUS, else one of the command's `builtin` types);
    None for anything else, which stays a traceback: a bug must not read like a wrong option."""
    for cls in type(error).__mro__:
        code = EXIT_STATUS.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return USAGE_ERROR if isinstance(error, builtin) else None


def errors(*builtin: type[Exception]) -> Callable[[Command], Command]:
    """Every command's error handling: a known error (EXIT_STATUS, or one of `builtin`, e.g.
    FileNotFoundError for a wrong --data) is `error: <message>` on stderr and its exit status, no
    traceback. Seventeen copies of the same try/except were kept in step by hand before."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(*args: object, **kwargs: object) -> object:
            try:
                return command(*args, **kwargs)
            except (typer.Exit, typer.Abort, click.ClickException):
                raise  # typer's own exits (click's Exit is a RuntimeError too)
            except Exception as error:
                code = exit_status(error, builtin)
                if code is None:
                    raise
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(code) from None

        run.reported_errors = builtin  # type: ignore[attr-defined]  # tests check every command
        return run  # type: ignore[return-value]

    return decorate


def settings_help(summary: str, *names: str) -> str:
    """A command's help with the settings it reads (environment variable, default, what), taken
    from core.settings so the list cannot drift; `run`, `node` and `dashboard` listed none."""
    from pydantic import SecretStr

    lines = []
    for name in names:
        field = Settings.model_fields[name]
        default = field.default
        shown = "" if default in (None, "") or isinstance(default, SecretStr) else str(default)
        lines.append(f"PNEUMO_{name.upper()}" + (f" ({shown})" if shown else "")
                     + f": {field.description or ''}".rstrip(": "))
    # One paragraph per setting: typer's help keeps paragraphs apart.
    return summary + "\n\nSettings (environment or PNEUMO_SETTINGS_FILE):\n\n" + "\n\n".join(lines)


def registry_dir(models_dir: Path | None) -> Path:
    """The registry a command uses: --models-dir, else the PNEUMO_MODELS_DIR setting (its env
    file included), so every model command and the workers read the same folder. Invalid settings
    raise SettingsError (one line and exit 2 through `errors`)."""
    if models_dir is not None:
        return models_dir
    from core.settings import load_settings

    return load_settings().models_dir


def command_settings() -> Settings:
    """The settings, loaded once at the start of a command and passed down; invalid ones are one
    line on stderr and exit status 2 (SettingsError through `errors`), the same for every command.
    A command that handles patient data creates its files private."""
    from core import logsafe
    from core.settings import load_settings

    logsafe.private_files()  # stored images, SRs, the database, logs (not models: `train` keeps 022)
    return load_settings()


def setup_logging(verbose: bool = False) -> None:
    """Scrubbed logging for a command that runs long: header values never reach a log line."""
    from core import logsafe, phi

    phi.install()  # library messages and tracebacks quote header values: scrubbed (core.phi)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic announces each of its plugins at INFO on every start: noise in the run's log.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logsafe.install()


def require_keras_backend() -> None:
    """Keras defaults to TensorFlow and, where it is not installed, fails deep inside its own
    import; a JAX or PyTorch host must say which backend to use, so tell the operator that."""
    if os.environ.get("KERAS_BACKEND") or importlib.util.find_spec("tensorflow") is not None:
        return
    raise SystemExit(
        "pneumo: TensorFlow is not installed and KERAS_BACKEND is not set; set KERAS_BACKEND=jax "
        "or KERAS_BACKEND=torch (whichever this host has), or install the project with TensorFlow"
    )
