"""The fast tier (`make test-unit`, `-m unit`) selects itself from what each test uses, and runs
without ../shared: a test needing PostgreSQL, Redis or ../shared never lands in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_unit_tier_collects_without_shared_and_leaves_out_every_service_test(tmp_path: Path) -> None:
    env = {**os.environ, "PNEUMO_SHARED": str(tmp_path / "no-shared"),
           "PNEUMO_TEST_POSTGRES": "postgresql+psycopg://postgres@127.0.0.1:1/test",
           "PNEUMO_TEST_REDIS": "redis://127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "unit", "-p", "no:cacheprovider",
         "tests/core/test_migrations.py",  # database_url: [sqlite] is unit, [postgresql] is not
         "tests/ops/test_dashboard_outcomes.py",  # Redis through fixtures imported from test_dashboard
         "tests/serving/test_image.py",  # reads ../shared on import: skipped, not an error
         "tests/test_layout.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    selected = {line for line in result.stdout.splitlines() if "::" in line}
    assert "tests/core/test_migrations.py::test_migrated_database_matches_the_models[sqlite]" in selected
    assert not any("[postgresql]" in line for line in selected)
    assert not any(line.startswith("tests/ops/test_dashboard_outcomes.py") for line in selected)
    assert any(line.startswith("tests/test_layout.py") for line in selected)
    assert "needs ../shared" in result.stdout
