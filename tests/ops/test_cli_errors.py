"""The CLI's one error decorator (ops/commands/common.py): every command has it, a known error is
one line and its exit status, and anything else stays a traceback."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from core.lifecycle import EXIT_CANNOT_START
from core.registry import CardError
from core.settings import SettingsError
from ops.cli import app
from ops.commands.common import errors, exit_status
from ops.status import BrokerDown, DatabaseNotFound


def every_command(typer_app: typer.Typer, path: str = "pneumo") -> list[tuple[str, object]]:
    """(name, callback) of every command, groups and merged areas included."""
    found = [(f"{path} {info.name or info.callback.__name__}", info.callback)
             for info in typer_app.registered_commands]
    for group in typer_app.registered_groups:
        found += every_command(group.typer_instance, f"{path} {group.name}" if group.name else path)
    return found


def test_every_command_reports_errors_through_the_decorator() -> None:
    commands = every_command(app)
    # 16 commands, models list/serve/accept-silent/candidate/clear-candidate/shadow/promote, scope
    # fit/refit, db upgrade, labels import/listen, scorecard
    assert len(commands) == 29
    assert [name for name, callback in commands if not hasattr(callback, "reported_errors")] == []


def test_known_errors_map_to_the_exit_status_they_always_had() -> None:
    assert exit_status(CardError("bad card")) == 2  # a subclass of RegistryError
    assert exit_status(SettingsError("bad")) == 2
    assert exit_status(DatabaseNotFound("none")) == 1
    assert exit_status(BrokerDown("down")) == 1
    from dicom_node.scp import CannotListen

    assert exit_status(CannotListen("port taken")) == EXIT_CANNOT_START
    assert exit_status(FileNotFoundError("x")) is None  # only where a command names it
    assert exit_status(FileNotFoundError("x"), (FileNotFoundError,)) == 2


def test_a_known_error_is_one_line_and_a_bug_stays_a_traceback() -> None:
    demo = typer.Typer()

    @demo.command()
    @errors(ValueError)
    def fail(kind: str) -> None:
        """Raise what --kind names."""
        if kind == "database":
            raise DatabaseNotFound("no database at x")
        if kind == "value":
            raise ValueError("wrong layout")
        if kind == "exit":
            raise typer.Exit(3)  # typer's own exit (a RuntimeError) passes through
        raise KeyError("a bug")

    runner = CliRunner()
    done = runner.invoke(demo, ["database"])
    assert (done.exit_code, done.stderr) == (1, "error: no database at x\n")
    done = runner.invoke(demo, ["value"])
    assert (done.exit_code, done.stderr.splitlines()) == (2, ["error: wrong layout"])
    assert runner.invoke(demo, ["exit"]).exit_code == 3
    done = runner.invoke(demo, ["bug"])
    assert isinstance(done.exception, KeyError)


@pytest.mark.parametrize("argv", [["models", "serve", "a", "b", "--models-dir", "{tmp}"],
                                  ["evaluate", "--model", "a", "--data", "{tmp}"]])
def test_a_command_error_is_one_line_with_exit_status_two(argv: list[str], tmp_path) -> None:
    done = CliRunner().invoke(app, [arg.format(tmp=tmp_path) for arg in argv])
    assert done.exit_code == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
