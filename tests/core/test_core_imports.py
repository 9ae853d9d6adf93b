"""The core is plain Python: importing every module of dlq_assets.core loads neither dagster nor click (nor rich),
so a pipeline can embed it without the Dagster layer or the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

_PROBE = """
import json, pkgutil, sys
import dlq_assets.core as core
names = [m.name for m in pkgutil.walk_packages(core.__path__, "dlq_assets.core.")]
for name in names:
    __import__(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"dagster", "click", "rich"})
print(json.dumps({"modules": len(names), "loaded": loaded}))
"""


def test_importing_the_whole_core_loads_neither_dagster_nor_click() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=True
    )
    report = json.loads(result.stdout)
    assert report["modules"] >= 15 and report["loaded"] == []
