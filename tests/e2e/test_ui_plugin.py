"""End to end, in a real Airflow and a real headless Chromium: the fleetmedic page in Airflow's UI.

Log in through Airflow's own login form, open the fleetmedic page from Airflow's navigation, see an
incident from the ops DB (inserted through the store), the latest trend tables and charts (made by a
real incident_trends run), ack it from the page (audited with the Airflow user's name), and save
screenshots under test-artifacts/. Without a login, or with a viewer's, the page refuses to act.

Touches no fleet resource: the incidents belong to a disabled inventory row of its own, which the
sweep never probes and the mass-failure guard never counts.

Chromium is driven through the DevTools protocol (websockets): no driver binary, no npm.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TYPE = "browser_check"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--window-size=1400,1000", "--hide-scrollbars",
]


class Chromium:
    """Headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("the browser test needs Chromium: apt-get install -y chromium "
                        "(or FLEETMEDIC_BROWSER=1 scripts/bootstrap.sh)")
        from websockets.sync.client import connect

        self.profile = Path(tempfile.mkdtemp(prefix="fleetmedic-chromium-"))
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"Chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise AssertionError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            self._events.append(msg)

    def navigate(self, url: str, timeout: float = 60) -> None:
        self._events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self._events):
            self._events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def js(self, expression: str) -> Any:
        """Evaluate in the page and return the (JSON) value."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"{expression}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def wait_js(self, expression: str, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; page: {self.js('location.href')}")
            time.sleep(0.25)

    def type_into(self, selector: str, text: str) -> None:
        """Focus and type as a user would (React's inputs only see real input events)."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", timeout=60, **params)["data"]))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Chromium]:
    chromium = Chromium()
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def check_resource(stack) -> int:
    """An inventory row of this test's own, disabled: never probed, never counted by the guard."""
    with psycopg.connect(stack.ops_dsn) as conn:
        row = conn.execute(
            "INSERT INTO resources (name, kind, role, host, port, enabled, attrs) "
            "VALUES ('ui-browser-check', 'postgres', 'standalone', '127.0.0.1', 1, false, '{\"test\": \"ui\"}') "
            "ON CONFLICT (name) DO UPDATE SET enabled = false RETURNING id").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def incident(request, stack, check_resource) -> Iterator[Any]:
    """A fresh open incident of this test's own type (one per test: an ignored one would be refreshed)."""
    store = IncidentStore(stack.ops_dsn)
    kind = TYPE if request.node.name.startswith("test_fleetmedic_page") else f"{TYPE}_auth"
    inc, created = store.open_or_refresh_incident(
        check_resource, kind, actor="detection:browser.check",
        reason=f"inserted by the browser test at {time.strftime('%H:%M:%S')}", severity="warning")
    assert created, f"an incident {kind} on ui-browser-check was already there: {inc}"
    yield inc
    if not store.get(inc.id).final:
        store.resolve(inc.id, actor="human:e2e-ui-test", reason="browser test done")


def _token(stack, user: str, password: str) -> str:
    r = httpx.post(f"{stack.airflow.url}/auth/token", json={"username": user, "password": password}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


def _viewer_token(stack) -> str:
    """A viewer's session token, signed by this Airflow's own auth manager with its own secret.

    The stack is configured with one (admin) user; SimpleAuthManager reads the user and role from the
    signed token, so this is exactly what Airflow's login hands a user configured as `vera:viewer`.
    """
    code = ("from airflow.api_fastapi.app import create_auth_manager\n"
            "from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser\n"
            "print(create_auth_manager().generate_jwt(SimpleAuthManagerUser(username='vera', role='viewer')))\n")
    res = subprocess.run([sys.executable, "-c", code], env=stack.airflow.env(), capture_output=True, text=True,
                         timeout=120, cwd=stack.airflow.home)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def _last_event(stack, incident_id: int) -> Any:
    return IncidentStore(stack.ops_dsn).events(incident_id)[-1]


def test_unauthenticated_and_read_only_requests_are_refused(stack, incident):
    base = f"{stack.airflow.url}/fleetmedic"
    action = f"{base}/incidents/{incident.id}/action"
    for method, url in (("GET", f"{base}/"), ("GET", f"{base}/api/status"), ("GET", f"{base}/charts/1/mttr_trend.png"),
                        ("POST", action)):
        r = httpx.request(method, url, data={"action": "ack", "reason": "x"} if method == "POST" else None,
                          timeout=30)
        assert r.status_code == 401, (method, url, r.status_code, r.text[:200])
        assert incident.type not in r.text
    r = httpx.get(f"{base}/", headers={"Authorization": "Bearer not-a-token"}, timeout=30)
    assert r.status_code in (401, 403) and incident.type not in r.text
    page = httpx.get(f"{base}/", headers={"Accept": "text/html"}, timeout=30)
    assert page.status_code == 401 and "behind Airflow's login" in page.text

    viewer = {"Authorization": f"Bearer {_viewer_token(stack)}"}
    page = httpx.get(f"{base}/", headers=viewer, timeout=30)
    assert page.status_code == 200, page.text[:500]
    assert f'data-incident="{incident.id}"' in page.text and "read only" in page.text
    assert "csrf_token" not in page.text  # no action forms for a viewer
    r = httpx.post(action, data={"action": "ack", "reason": "viewer tries"}, headers=viewer, timeout=30)
    assert r.status_code == 403 and "needs an operator" in r.text
    assert _last_event(stack, incident.id).reason.startswith("inserted by the browser test")

    # an operator's browser session (cookie) still needs the page's form token and its own origin
    cookies = {"_token": _token(stack, stack.airflow.user, stack.airflow.password)}
    with httpx.Client(cookies=cookies, timeout=30) as session:
        r = session.post(action, data={"action": "ack", "reason": "forged"})
        assert r.status_code == 403 and "form token" in r.text
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', session.get(f"{base}/").text)
        assert csrf is not None
        r = session.post(action, data={"action": "ack", "reason": "forged", "csrf_token": csrf.group(1)},
                         headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.text
    assert _last_event(stack, incident.id).reason.startswith("inserted by the browser test")

    # the REST way for scripts: a Bearer token, no form token needed; ignore is audited with the user
    admin = {"Authorization": f"Bearer {cookies['_token']}"}
    r = httpx.post(action, data={"action": "ignore:1h", "reason": "scripted ignore"}, headers=admin, timeout=30)
    assert r.status_code == 200 and "ignored until" in r.json()["done"]
    ignored = IncidentStore(stack.ops_dsn).get(incident.id)
    assert ignored.state == "ignored"
    assert _last_event(stack, incident.id).actor == f"human:{stack.airflow.user}"


def test_fleetmedic_page_in_airflow_shows_incidents_trends_and_acks(stack, airflow, incident, browser, wait_until):
    # a real incident_trends run, so the page has trend tables and charts to show
    run = airflow.trigger("incident_trends", run_id=f"ui-test-{int(time.time())}", conf={"period": "1d"})
    done = airflow.wait_for_run("incident_trends", run["dag_run_id"], timeout=240, echo=False)
    assert done["state"] == "success", done
    with psycopg.connect(stack.ops_dsn) as conn:
        latest = conn.execute("SELECT id, period, generated_by FROM report_runs ORDER BY generated_at DESC LIMIT 1"
                              ).fetchone()
    assert latest is not None and latest[1] == "1d" and latest[2] == "automation:incident_trends/build_report"

    url = stack.airflow.url
    browser.navigate(f"{url}/fleetmedic/")
    browser.wait_js("document.body && document.body.innerText.includes(\"behind Airflow's login\")",
                    "the page to refuse a browser that has not logged in")

    browser.navigate(f"{url}/auth/login?next={url}/")
    browser.wait_js("!!document.querySelector('input[name=username]')", "Airflow's login form")
    browser.type_into("input[name=username]", stack.airflow.user)
    browser.type_into("input[name=password]", stack.airflow.password)
    browser.wait_js("!document.querySelector('button[type=submit]').disabled", "the sign-in button")
    browser.js("document.querySelector('button[type=submit]').click()")
    browser.wait_js("document.cookie.includes('_token=') || !location.pathname.startsWith('/auth')",
                    "the login to complete")

    # the fleetmedic entry in Airflow's navigation opens the page (embedded by Airflow's UI)
    browser.navigate(f"{url}/")
    link = browser.wait_js(
        "(() => { const a = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'fleetmedic');"
        " return a ? a.getAttribute('href') : null; })()", "the fleetmedic link in Airflow's navigation")
    assert link.endswith("plugin/fleetmedic"), link
    browser.js("[...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'fleetmedic').click()")
    frame = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"
    row = f"{frame} && {frame}.querySelector('tr[data-incident=\"{incident.id}\"]')"
    browser.wait_js(f"!!({row})", f"incident {incident.id} on the fleetmedic page inside Airflow")
    cells = browser.js(f"[...({row}).querySelectorAll('td')].map(td => td.innerText.trim())")
    assert cells[:4] == [str(incident.id), TYPE, "ui-browser-check", "open"], cells
    href = browser.js(f"({row}).querySelector('a').getAttribute('href')")
    assert href == f"/dags/playbook_{TYPE}/runs/incident-{incident.id}"
    assert browser.js(f"{frame}.querySelector('#user').innerText") == stack.airflow.user
    browser.wait_js(f"[...{frame}.querySelectorAll('.charts img')].length === 3 && "
                    f"[...{frame}.querySelectorAll('.charts img')].every(i => i.complete && i.naturalWidth > 300)",
                    "the three trend charts to load")
    titles = browser.js(f"[...{frame}.querySelectorAll('h2')].map(h => h.innerText)")
    for title in ("Open incidents", "Breakers", "Latest trends", "Kernel panics in last 1d",
                  "Stale incidents (over 2 days old)", "Total incidents"):
        assert title in titles, titles
    total = browser.js(f"[...{frame}.querySelectorAll('table[data-table=total] tr')].map(r => r.innerText)")
    assert any(TYPE in line for line in total), total
    shot = browser.screenshot(ARTIFACTS / "ui_plugin_in_airflow.png")
    assert shot.stat().st_size > 50_000

    # ack from the page: the form posts with its token, the page says what it did, the audit trail has the user
    browser.js(f"(() => {{ const f = ({row}).querySelector('form'); f.querySelector('select').value = 'ack';"
               f" f.querySelector('input[name=reason]').value = 'seen in the browser test'; f.requestSubmit(); }})()")
    message = browser.wait_js(f"{frame} && {frame}.querySelector('#done') && {frame}.querySelector('#done').innerText",
                              "the page to confirm the ack")
    assert message.startswith(f"incident {incident.id}: acknowledged by human:{stack.airflow.user}")
    event = _last_event(stack, incident.id)
    assert event.actor == f"human:{stack.airflow.user}" and event.data.get("ack") is True
    assert "seen in the browser test" in event.reason

    browser.navigate(f"{url}/fleetmedic/")
    browser.wait_js(f"!!document.querySelector('tr[data-incident=\"{incident.id}\"]')", "the page on its own")
    browser.screenshot(ARTIFACTS / "ui_plugin_page.png", full_page=True)
