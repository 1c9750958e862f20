"""The dashboard end to end in headless Chromium (Debian's package, driven by Playwright).

A simulated fleet (three real agents on the in-memory broker, all on digits v1) and a rollout
of v2 in progress (its canary deployed, baking); the API and dashboard on uvicorn on a free
loopback port, without a broker connection (so no Roll back button). A deployer logs in with a
token, sees the fleet and the rollout, and pauses it from the page; a viewer sees the same
pages without a button that changes state. Screenshots go to ``build/artifacts/dashboard/``.
Chromium is installed with apt-get when it is missing
(the test skips, saying why, where that is not possible).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from edgefleet.console.api import create_app
from edgefleet.coordinator import access, telemetry
from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage
from edgefleet.coordinator.rollouts import Rollouts
from edgefleet.simulations.workload import Workload

from tests.conftest import Digits
from tests.integration.fleet import open_fleet, wait_until

pytestmark = [pytest.mark.timeout(300)]
DEVICES = ["dev-0", "dev-1", "dev-2"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts" / "dashboard"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and apt-get cannot install it here (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    found = shutil.which("chromium")
    if done.returncode != 0 or not found:
        pytest.skip(f"apt-get install chromium failed: {done.stderr.strip()[-300:]}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser_path() -> str:
    return chromium()


@pytest.fixture
def site(tmp_path: Path, digits_v1: Digits) -> Iterator[tuple[str, Rollouts, int, dict[str, str]]]:
    with open_fleet(tmp_path, digits_v1, DEVICES, kind="memory") as fleet:
        fleet.start_service()
        for d in DEVICES:
            fleet.start_agent(d)
        first = fleet.release("1", "all")
        fleet.wait_active(DEVICES, first.sequence)
        Workload(fleet).step(20)  # live inferences: the agents report inference telemetry
        wait_until(lambda: telemetry.version_totals(fleet.coordinator.registry).get(
            "digits@1", {}).get("count", 0) >= 20 * len(DEVICES), "the agents' telemetry")
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(RolloutSpec(
            name="digits", version="2", canary=Stage.parse("device:dev-0"),
            waves=(Stage.parse("100%"),), gates=(Gate.parse("error_rate<0.01"),), bake=3600))
        ro.tick(rid)  # the canary's release goes out: the rollout is in progress
        tokens = {role: access.create_token(fleet.coordinator.registry, name=f"{role}-ui",
                                            role=role, by="test")
                  for role in ("viewer", "deployer")}  # fmt: skip
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(fleet.coordinator), host="127.0.0.1",
                                               port=port, log_level="warning"))  # fmt: skip
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started, "uvicorn to start")
        try:
            yield f"http://127.0.0.1:{port}", ro, rid, tokens
        finally:
            server.should_exit = True
            thread.join(10)


def _login(page: object, url: str, token: str) -> None:
    page.goto(url + "/")  # type: ignore[attr-defined]
    page.fill("#token", token)  # type: ignore[attr-defined]
    page.click("#login-form button")  # type: ignore[attr-defined]
    page.wait_for_selector("#fleet table tbody tr")  # type: ignore[attr-defined]


def test_a_deployer_pauses_a_rollout_from_the_page_and_a_viewer_cannot(
    browser_path: str, site: tuple[str, Rollouts, int, dict[str, str]]
) -> None:
    from playwright.sync_api import sync_playwright

    url, ro, rid, tokens = site
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            _login(page, url, tokens["deployer"])
            rows = page.locator("#fleet table tbody tr")
            assert rows.count() == len(DEVICES)
            text = page.locator("#fleet").inner_text()
            assert all(d in text for d in DEVICES) and "digits 1 (#1)" in text
            assert "deployer-ui (deployer)" in page.inner_text("#who")
            page.screenshot(path=str(ARTIFACTS / "fleet.png"), full_page=True)

            page.click("nav a[data-tab=rollouts]")
            card = page.locator(f"[data-rollout='{rid}']")
            card.wait_for()
            assert card.locator("[data-phase]").inner_text().startswith("deploying")
            # This API runs without a broker connection (no publisher): no Roll back button,
            # since the API would answer 503; pausing needs none.
            assert card.locator("button[data-action=pause]").count() == 1
            assert card.locator("button[data-action=rollback]").count() == 0
            page.screenshot(path=str(ARTIFACTS / "rollout-deployer.png"), full_page=True)
            card.locator("button[data-action=pause]").click()
            page.wait_for_selector(f"[data-rollout='{rid}'] button[data-action=resume]")
            assert "(paused)" in card.locator("[data-phase]").inner_text()
            assert ro.store.get(rid).state.paused  # the registry says so, not only the page
            entry = access.audit_log(ro.registry, action="rollout.pause")[0]
            assert (entry.actor, entry.result) == ("deployer-ui", "ok")
            page.screenshot(path=str(ARTIFACTS / "rollout-paused.png"), full_page=True)

            for tab in ("versions", "fl", "telemetry", "drift", "audit"):
                page.click(f"nav a[data-tab={tab}]")
                page.wait_for_selector(f"#{tab} h2")
                page.wait_for_function("document.getElementById('status').className === 'hint'")
                page.screenshot(path=str(ARTIFACTS / f"{tab}.png"), full_page=True)
            assert page.locator("#versions tbody tr").count() == 2  # digits 1 and 2
            assert page.locator("#telemetry svg.chart").count() >= 2  # latency, errors
            assert "digits@1" in page.inner_text("#telemetry")
            assert "rollout.pause" in page.inner_text("#audit")

            viewer = browser.new_page(viewport={"width": 1280, "height": 800})
            _login(viewer, url, tokens["viewer"])
            viewer.click("nav a[data-tab=rollouts]")
            viewer.locator(f"[data-rollout='{rid}']").wait_for()
            assert viewer.locator("button[data-action]").count() == 0
            assert viewer.locator("nav a[data-tab=audit]").is_hidden()
            viewer.screenshot(path=str(ARTIFACTS / "rollout-viewer.png"), full_page=True)
            # The page hides the buttons; the API refuses the change anyway.
            answer = viewer.evaluate(
                """async (id) => (await fetch(`/api/v1/rollouts/${id}/resume`, {method: "POST",
                     headers: {Authorization: "Bearer " + sessionStorage.getItem(
                     "edgefleet.token")}})).status""", rid)  # fmt: skip
            assert answer == 403
            assert ro.store.get(rid).state.paused
        finally:
            browser.close()
