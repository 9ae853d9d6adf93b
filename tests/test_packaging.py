"""The package installs anywhere: a wheel holds its SQL, and an install outside the checkout creates the schema,
runs the demo and loads the Dagster code location against a server URL."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import psycopg

from tests.conftest import REPO_ROOT


def test_the_package_list_names_every_package() -> None:
    listed = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["packages"]
    found = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts) for init in (REPO_ROOT / "dlq_assets").rglob("__init__.py")
    }
    data = {"dlq_assets.data", "dlq_assets.sql", "dlq_assets.sql.functions", "dlq_assets.sql.migrations"}
    assert sorted(listed) == sorted(found | data)


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_a_wheel_installed_outside_the_checkout_works_against_a_server_url(empty_db_url: str, tmp_path: Path) -> None:
    wheels, elsewhere = tmp_path / "wheels", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLQ_", "PYTHON", "DAGSTER_"))}
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO_ROOT), "-w", str(wheels)], tmp_path, env
    )
    (wheel,) = wheels.glob("dlq_assets-*.whl")

    # A fresh venv whose dependencies are this one's site-packages as a plain path entry: the editable install's
    # finder (a .pth hook there) stays out, so the only dlq_assets it can import is the wheel's.
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], tmp_path, env)

    env["DLQ_DATABASE_URL"] = empty_db_url
    where = run([str(python), "-c", "import dlq_assets; print(dlq_assets.__file__)"], elsewhere, env).stdout
    assert where.startswith(str(site)), where
    run([str(target / "bin" / "dlq"), "create"], elsewhere, env)
    run([str(target / "bin" / "dlq"), "demo", "--events", "300"], elsewhere, env)
    validated = run(
        [str(python), "-m", "dagster", "definitions", "validate", "-m", "dlq_assets.definitions"], elsewhere, env
    )
    assert "Validation successful" in validated.stdout + validated.stderr
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM dlq_schema_functions").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()[0] > 0
