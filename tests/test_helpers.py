"""The shared test helpers: the one rule for a missing external program, and waiting."""

from __future__ import annotations

import pytest

from tests.helpers import free_port, requires_program, wait_for


def test_a_missing_program_skips_with_the_package_to_install() -> None:
    marker = requires_program("no-such-program-4711", "no-such-package")
    assert marker.name == "skipif" and marker.args == (True,)
    assert marker.kwargs["reason"] == (
        "no-such-program-4711 missing: install Debian's no-such-package (.ci/run does)")
    assert requires_program("sh", "dash").args == (False,)


def test_wait_for_returns_the_value_or_fails_naming_what_it_waited_for() -> None:
    values = iter([0, None, 7])
    assert wait_for(lambda: next(values), 5, "a value", interval_s=0.01) == 7
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        wait_for(lambda: False, 0.05, "nothing", interval_s=0.01)
    assert 0 < free_port() < 65536
