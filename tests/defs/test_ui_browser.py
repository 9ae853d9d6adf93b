"""The Dagster UI as a user finds it after `make run` (`dlq demo --dagster`, then `dlq dev`), seen through headless
Chromium: every asset materialized, the processed batch's checks passed and its metadata plotted, no modal over the
page. The GraphQL API is asked the same, so a failure says whether the data or its display is missing.

Screenshots of every page visited go to $DLQ_TEST_ARTIFACTS/ui (default build/test-artifacts/ui);
DLQ_UPDATE_README_SCREENSHOT=1 also refreshes docs/images/ui-first-screen.png, the README's picture of the UI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.devtools.first_run import materialize_everything
from dlq_assets.devtools.generator import write_corrupted_log
from tests.defs.dagster_dev import DagsterDev, dagster_dev, dev_environment, settled_asset_node

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: Playwright drives it, it downloads no browser of its own


def _missing_browser() -> str | None:
    """What keeps the browser from running, said with the way to install it; None when both parts are there."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"no Chromium at {CHROMIUM} (install Debian's package: apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append(
            "no playwright module (pip install -e '.[dev]' pins it; `playwright install` is not needed: "
            "the test drives the system Chromium)"
        )
    return "; ".join(missing) or None


if _missing := _missing_browser():
    pytest.skip(f"browser test of the Dagster UI: {_missing}", allow_module_level=True)

from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402  (after the skip above)

REPO_ROOT = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO_ROOT / "docs" / "images" / "ui-first-screen.png"
ASSETS = ("dlq_schema", "dlq_partitions", "dlq_processed_batches", "dlq_failure_patterns", "dlq_retention_state")
PROCESSED = "dlq_processed_batches"
PLOTTED = ("backlog_pending", "processed", "repaired")  # numeric metadata of a processed batch, one chart each
VIEWPORT = {"width": 1440, "height": 900}
UI_TIMEOUT_MS = 30_000  # for a loaded CI machine: the first pages wait on the code location and the database

# A chart drawn with data: Chart.js paints its lines and points in the accent blue; axes, grid and labels are gray.
PAINTED = """canvas => {
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let blue = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const [r, g, b, a] = [pixels[i], pixels[i + 1], pixels[i + 2], pixels[i + 3]];
    if (a > 128 && b - r > 60 && b - g > 60) blue++;
  }
  return blue >= 8;
}"""

LATEST = """
query($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) { assetKey { path } assetMaterializations(limit: 1) { runId timestamp } }
}
"""
RUNS = "query($ids: [String!]) { runsOrError(filter: {runIds: $ids}) { ... on Runs { results { runId status } } } }"
CHECKS = """
{ assetNodes(assetKeys: [{path: ["dlq_processed_batches"]}]) {
    assetChecksOrError { ... on AssetChecks { checks { name
      executionForLatestMaterialization { status evaluation { success } } } } } } }
"""


def _artifacts() -> Path:
    """Where the screenshots go: kept after the run (CI can publish them), never under tmp_path."""
    root = Path(os.environ.get("DLQ_TEST_ARTIFACTS") or REPO_ROOT / "build" / "test-artifacts")
    shots = root / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "failure.png").unlink(missing_ok=True)  # from an earlier run that failed
    return shots


def _assert_api(dev: DagsterDev, runs: dict[str, str], checks: dict[str, bool]) -> None:
    """The instance the UI serves holds the first run: its five runs succeeded, each asset has a latest
    materialization, and every check of the processed batch succeeded."""
    results = dev.graphql(RUNS, {"ids": list(runs.values())})["runsOrError"]["results"]
    assert {r["runId"]: r["status"] for r in results} == dict.fromkeys(runs.values(), "SUCCESS"), results
    nodes = dev.graphql(LATEST, {"keys": [{"path": [a]} for a in ASSETS]})["assetNodes"]
    latest = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"] for n in nodes}
    assert set(latest) == set(ASSETS), latest
    for asset, materializations in latest.items():
        assert materializations and materializations[0]["runId"], (asset, materializations)
    node = settled_asset_node(dev.port, CHECKS, time.monotonic() + 60)
    executions = {c["name"]: c["executionForLatestMaterialization"] for c in node["assetChecksOrError"]["checks"]}
    assert set(executions) == set(checks), (executions, checks)
    for name, execution in executions.items():
        assert execution and execution["status"] == "SUCCEEDED" and execution["evaluation"]["success"], name


def _assert_no_modal(page: Page) -> None:
    """Nothing covers the page once it has loaded: no "Join the Dagster community" and no other dialog."""
    page.wait_for_load_state("networkidle")
    expect(page.get_by_role("dialog")).to_have_count(0)
    expect(page.get_by_text("Join the Dagster community")).to_have_count(0)


def _assert_materialized(page: Page, base: str, asset: str) -> None:
    """The asset's overview shows its latest materialization: a successful run, some time ago."""
    page.goto(f"{base}/assets/{asset}")
    latest = page.get_by_text("Latest materialization", exact=True).locator("xpath=following-sibling::*[1]")
    expect(latest.get_by_role("link", name=re.compile(r" ago$"))).to_be_visible()
    expect(latest.get_by_role("img", name="run_success")).to_be_visible()
    expect(page.get_by_text("Never materialized")).to_have_count(0)
    _assert_no_modal(page)


def _assert_checks_passed(page: Page, base: str, names: list[str]) -> None:
    """The checks tab lists every check as succeeded; a blocking one, opened, shows its evaluation passed."""
    page.goto(f"{base}/assets/{PROCESSED}?view=checks")
    expect(page.get_by_text(f"Checks ({len(names)})", exact=True)).to_be_visible()
    for name in names:
        row = page.locator("[class*='checkRow']").filter(has=page.get_by_title(name, exact=True))
        expect(row).to_contain_text("Succeeded")
        expect(row.get_by_role("img", name="check_circle")).to_be_visible()
    page.get_by_title("stale_locks", exact=True).click()
    expect(page.get_by_text("blocking", exact=True)).to_be_visible()
    expect(page.get_by_text("Passed", exact=True)).to_be_visible()
    _assert_no_modal(page)


def _chart(page: Page, title: str) -> Locator:
    """The canvas under a plot's title (the title is a span, the chart the next box beside it)."""
    return page.get_by_text(title, exact=True).locator("xpath=../following-sibling::div//canvas")


def _assert_plots_drawn(page: Page, base: str) -> None:
    """The overview's metadata, switched to plots, draws a chart with data for each numeric value plotted."""
    page.goto(f"{base}/assets/{PROCESSED}")
    page.get_by_role("button", name="Plots").click()
    for title in PLOTTED:
        canvas = _chart(page, title)
        expect(canvas).to_be_visible()
        page.wait_for_function(PAINTED, arg=canvas.element_handle(), timeout=UI_TIMEOUT_MS)
    page.get_by_text("Metadata", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
    _assert_no_modal(page)


def _assert_catalogue(page: Page, base: str) -> None:
    """The asset catalogue lists the five assets as materialized (the partitioned one by its partition counts)."""
    page.goto(f"{base}/assets")
    for asset in ASSETS:
        row = page.locator("[class*='VirtualizedTable_row']").filter(has=page.locator(f'a[href="/assets/{asset}"]'))
        if asset == "dlq_partitions":
            expect(row).to_contain_text(re.compile(r"\d+ partitions"))
            done = row.get_by_role("img", name="partition_success").first.locator("xpath=..")
            expect(done).to_have_text(re.compile(r"^[1-9]\d*$"))
        else:
            expect(row).to_contain_text("Materialized")
    _assert_no_modal(page)


def _assert_lineage(page: Page, base: str, checks: int) -> None:
    """The global lineage draws the five assets, the processed batch with all its checks passed."""
    page.goto(f"{base}/asset-groups")
    expect(page.get_by_text(f"{checks} / {checks} Passed", exact=True)).to_be_visible()
    for asset in ASSETS:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    expect(page.get_by_text("Never materialized")).to_have_count(0)
    _assert_no_modal(page)


def test_the_ui_after_the_demo_shows_every_asset_materialized_with_checks_and_charts(
    db_url: str, server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=2000, seed=1, corruption_rate=0.3)  # what `dlq demo` writes
    ingest_paths([log], url=db_url)
    dagster_database = f"dagster_{uuid.uuid4().hex[:10]}"
    for key, value in dev_environment(db_url, tmp_path, dagster_database).items():
        monkeypatch.setenv(key, value)
    first = materialize_everything(db_url, dagster_home=tmp_path / "dagster_home")
    assert set(first.metadata) == set(ASSETS), first.metadata
    assert first.checks and all(first.checks.values()), first.checks

    shots = _artifacts()
    with dagster_dev(db_url, server_url, tmp_path, dagster_database=dagster_database) as dev:
        _assert_api(dev, first.runs, first.checks)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
            try:
                page = browser.new_page(viewport=VIEWPORT)  # a new profile: nothing dismissed before
                page.set_default_timeout(UI_TIMEOUT_MS)
                expect.set_options(timeout=UI_TIMEOUT_MS)
                try:
                    _assert_lineage(page, dev.url, len(first.checks))
                    page.screenshot(path=shots / "lineage.png")
                    _assert_catalogue(page, dev.url)
                    page.screenshot(path=shots / "catalogue.png")
                    for asset in ASSETS:
                        _assert_materialized(page, dev.url, asset)
                        page.screenshot(path=shots / f"{asset}.png")
                    _assert_checks_passed(page, dev.url, sorted(first.checks))
                    page.screenshot(path=shots / f"{PROCESSED}-checks.png")
                    _assert_plots_drawn(page, dev.url)
                    page.screenshot(path=shots / f"{PROCESSED}-plots.png")
                except Exception:
                    page.screenshot(path=shots / "failure.png")  # what the user would have seen instead
                    raise
            finally:
                browser.close()
    if os.environ.get("DLQ_UPDATE_README_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots / "lineage.png", README_SCREENSHOT)
