"""The fleetmedic page inside Airflow's UI: open incidents, breakers, latest trends; audited operator actions.

A FastAPI app the Airflow 3 api-server mounts at `/fleetmedic` (plugin `fastapi_apps`), shown in the
UI's navigation through an `external_views` entry (the UI embeds it at /plugin/fleetmedic).

Security, all through Airflow's own auth manager (nothing of our own to log in to):
- every route needs Airflow's login: the UI's session cookie (`_token`) or `Authorization: Bearer <JWT>`
  from `POST /auth/token`, checked by `airflow.api_fastapi.core_api.security.get_user`; no token or a
  bad one is refused (401/403);
- reading needs access to the custom view `fleetmedic` (SimpleAuthManager: any role);
- ack / ignore / breaker reset need an operator: a user Airflow lets change connections (SimpleAuthManager
  roles `op` and `admin`; FAB's Op and Admin);
- those POSTs are CSRF-safe: a browser request (cookie) must carry the form's token (an HMAC of the user
  and the hour with the api secret key) and, when the browser sends one, a same-origin Origin header.
  Requests with a Bearer token are not exposed to CSRF (browsers never add that header by themselves);
- every action is audited on the incident or breaker with actor `human:<airflow user>`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["EXTERNAL_VIEW", "URL_PREFIX", "create_app", "csrf_token", "may_operate", "run_link"]

log = logging.getLogger(__name__)

URL_PREFIX = "/fleetmedic"
VIEW_NAME = "fleetmedic"
CSRF_FIELD = "csrf_token"
CSRF_HOURS = 12  # a rendered form stays usable this long
IGNORE_CHOICES = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "1d": timedelta(days=1),
                  "7d": timedelta(days=7)}

ICON = (
    "data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'>"
    "<path fill='%23e5484d' d='M10 3h4v7h7v4h-7v7h-4v-7H3v-4h7z'/></svg>"
)
EXTERNAL_VIEW: dict[str, Any] = {
    "name": "fleetmedic",
    "href": f"{URL_PREFIX}/",
    "url_route": "fleetmedic",
    "destination": "nav",
    "nav_top_level": True,
    "icon": ICON,
}


# -- who is asking ---------------------------------------------------------------------------------

def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


async def _user(request: Request) -> Any:
    """The Airflow user of this request (cookie or Bearer JWT), or HTTP 401/403 from Airflow itself."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user, oauth2_scheme

    token = await oauth2_scheme(request)
    credentials = await bearer_scheme(request)
    return await get_user(request, token, credentials)


def may_view(user: Any) -> bool:
    return bool(_auth_manager().is_authorized_custom_view(method="GET", resource_name=VIEW_NAME, user=user))


def may_operate(user: Any) -> bool:
    """Operators may act: users Airflow lets change connections (SimpleAuthManager: op and admin)."""
    am = _auth_manager()
    return bool(am.is_authorized_custom_view(method="POST", resource_name=VIEW_NAME, user=user)
                and am.is_authorized_connection(method="PUT", user=user))


async def viewer(request: Request) -> Any:
    user = await _user(request)
    if not may_view(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{user.get_name()} may not view the fleetmedic page")
    return user


def actor_of(user: Any) -> str:
    return f"human:{user.get_name()}"


# -- CSRF --------------------------------------------------------------------------------------------

def _secret() -> bytes:
    from airflow.configuration import conf

    secret = conf.get("api", "secret_key", fallback="") or os.environ.get("AIRFLOW__API__SECRET_KEY", "")
    if not secret:
        raise RuntimeError("[api] secret_key is not set: the fleetmedic page needs it to sign its forms")
    return secret.encode()


def csrf_token(user_name: str, *, at: float | None = None) -> str:
    """The form token for `user_name` in the current hour bucket (valid CSRF_HOURS)."""
    bucket = int((at if at is not None else time.time()) // 3600)
    return hmac.new(_secret(), f"fleetmedic-csrf:{user_name}:{bucket}".encode(), hashlib.sha256).hexdigest()


def _csrf_ok(user_name: str, token: str | None) -> bool:
    if not token:
        return False
    now = time.time()
    return any(hmac.compare_digest(csrf_token(user_name, at=now - h * 3600), token) for h in range(CSRF_HOURS))


def _check_csrf(request: Request, user: Any, token: str | None) -> None:
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return  # not sent by a browser on its own: no cross-site request can carry it
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"cross-origin request refused (Origin {origin} is not this server {host})")
    if not _csrf_ok(user.get_name(), token):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "missing or stale form token: reload the fleetmedic page and try again")


async def operator(request: Request, user: Any = Depends(viewer)) -> Any:
    if not may_operate(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"{user.get_name()} may not act on incidents or breakers: that needs an operator "
                            "(Airflow role op or admin)")
    return user


# -- data --------------------------------------------------------------------------------------------

def ops_dsn() -> str:
    """FLEETMEDIC_OPS_DSN if set, else the Airflow connection `fleetmedic_ops`."""
    if os.environ.get("FLEETMEDIC_OPS_DSN"):
        return os.environ["FLEETMEDIC_OPS_DSN"]
    from fleetmedic.airflow.connections import ops_dsn as from_connection

    return from_connection()


def _airflow_base() -> str:
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def run_link(incident: dict[str, Any], base: str = "") -> str:
    """The playbook DAG run that owns (or owned) the incident: /dags/playbook_<type>/runs/<run id>."""
    run_id = incident.get("owner_run_id") or f"incident-{incident['id']}"
    return f"{base}/dags/playbook_{quote(str(incident['type']))}/runs/{quote(str(run_id))}"


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return ""
    s = int((now - when).total_seconds())
    if s < 3600:
        return f"{max(s, 0) // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _page_context(dsn: str) -> dict[str, Any]:
    from fleetmedic.reports.status import fleet_status
    from fleetmedic.reports.trends import chart_list, load_trends

    snapshot = fleet_status(dsn, limit=200)
    report = None
    charts: list[dict[str, str]] = []
    try:
        report = load_trends(dsn, limit=10)
        if report is not None and report.run_id is not None:
            charts = chart_list(dsn, report.run_id)
    except Exception as exc:  # no report tables yet (migration pending) must not hide the incidents
        log.warning("fleetmedic page: no trend report (%s)", exc)
    return {"status": snapshot, "report": report, "charts": charts}


# -- the page ------------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fleetmedic</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1rem 1.4rem; color: #1d2733; }
 h1 { font-size: 1.35rem; margin: 0 0 .2rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
 .meta, .desc { color: #56616d; font-size: .82rem; }
 table { border-collapse: collapse; font-size: .82rem; }
 th, td { border-bottom: 1px solid #dde3e8; padding: .25rem .6rem; text-align: left; vertical-align: top; }
 th { background: #f2f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .state-escalated { color: #b42318; font-weight: 600; } .state-held { color: #b54708; font-weight: 600; }
 .breaker-open, .breaker-half_open { color: #b42318; font-weight: 600; }
 .tiles { display: flex; gap: .8rem; flex-wrap: wrap; }
 .tile { border: 1px solid #dde3e8; border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; }
 .tile b { font-size: 1.3rem; display: block; }
 .done { background: #ecfdf3; border: 1px solid #abefc6; padding: .4rem .7rem; border-radius: 4px; }
 form.act { display: flex; gap: .3rem; margin: 0; } form.act input[type=text] { width: 13rem; }
 .charts { display: flex; flex-wrap: wrap; gap: .5rem; } .charts img { width: 32%; min-width: 380px;
 border: 1px solid #dde3e8; }
 .empty { color: #56616d; font-style: italic; }
</style></head><body>
<h1>fleetmedic</h1>
<p class="meta">signed in as <b id="user">{{ user }}</b> ({{ "operator" if operator else "read only" }}) ·
 {{ now }} UTC · <a href="{{ base }}/">refresh</a> · <a href="{{ base }}/api/status">status JSON</a></p>
{% if done %}<p class="done" id="done">{{ done }}</p>{% endif %}
<div class="tiles">
 <div class="tile"><b id="active-incidents">{{ s.incidents.active }}</b>active incidents</div>
 <div class="tile"><b>{{ s.fleet.unhealthy }}</b>unhealthy of {{ s.fleet.resources }} resources</div>
 <div class="tile"><b>{{ s.breakers_open|length }}</b>breakers not closed</div>
 <div class="tile"><b>{{ s.pages.undelivered }}</b>undelivered pages</div>
</div>

<h2>Open incidents</h2>
{% if incidents %}
<table id="incidents"><thead><tr><th>id</th><th>type</th><th>resource</th><th>state</th><th>step</th><th>age</th>
<th>reason</th><th>playbook run</th>{% if operator %}<th>act (audited as {{ actor }})</th>{% endif %}</tr></thead><tbody>
{% for i in incidents %}<tr data-incident="{{ i.id }}"><td>{{ i.id }}</td><td>{{ i.type }}</td><td>{{ i.resource }}</td>
<td class="state-{{ i.state }}">{{ i.state }}</td><td>{{ i.step or "" }}</td><td>{{ i.age }}</td><td>{{ i.reason }}</td>
<td><a href="{{ i.run_link }}" target="_top">{{ i.run_id }}</a></td>
{% if operator %}<td><form class="act" method="post" action="{{ base }}/incidents/{{ i.id }}/action">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<select name="action"><option value="ack">ack</option>{% for u in ignore_choices %}<option value="ignore:{{ u }}">ignore {{ u }}</option>{% endfor %}</select>
<input type="text" name="reason" placeholder="reason (audited)" required>
<button type="submit">apply</button></form></td>{% endif %}</tr>
{% endfor %}</tbody></table>
{% if more_incidents %}<p class="desc">… and {{ more_incidents }} more (fleetmedic incidents list)</p>{% endif %}
{% else %}<p class="empty" id="incidents">no open incidents</p>{% endif %}

<h2>Breakers</h2>
{% if breakers %}
<table id="breakers"><thead><tr><th>breaker</th><th>state</th><th>since</th><th>by</th><th>reason</th>
{% if operator %}<th></th>{% endif %}</tr></thead><tbody>
{% for b in breakers %}<tr><td>{{ b.name }}</td><td class="breaker-{{ b.state }}">{{ b.state }}</td><td>{{ b.since }}</td>
<td>{{ b.changed_by or "" }}</td><td>{{ b.reason or "" }}</td>
{% if operator %}<td>{% if b.state != "closed" %}<form class="act" method="post" action="{{ base }}/breakers/{{ b.name|urlencode }}/reset">
<input type="hidden" name="csrf_token" value="{{ csrf }}"><input type="text" name="reason" placeholder="what you checked (audited)" required>
<button type="submit">reset</button></form>{% endif %}</td>{% endif %}</tr>
{% endfor %}</tbody></table>
{% else %}<p class="empty">no breakers yet</p>{% endif %}
{% for o in s.shadow_overrides %}<p class="shadow-override" data-playbook="{{ o.type }}"><b>playbook {{ o.type }} is in
 shadow</b> (acts on nothing): put there by {{ o.actor }} at {{ o.set_at.strftime("%Y-%m-%d %H:%M") }} UTC: {{ o.reason }}
 · <code>fleetmedic shadow off {{ o.type }} --reason ...</code></p>{% endfor %}

<h2>Latest trends</h2>
{% if report %}
<p class="meta">{{ report.period.label }} · {{ "{:,}".format(report.incidents) }} incidents ·
 generated {{ report.generated_at.strftime("%Y-%m-%d %H:%M") }} UTC by {{ report.generated_by }}
 · <a href="{{ airflow }}/dags/incident_trends" target="_top">incident_trends DAG</a></p>
<div class="charts">{% for c in charts %}<img src="{{ base }}/charts/{{ report.run_id }}/{{ c.name }}.png" alt="{{ c.title }}" title="{{ c.title }}">{% endfor %}</div>
{% for t in tables %}<h2 id="trend-{{ t.name }}">{{ t.title }}</h2>
{% if t.rows %}<table class="trend" data-table="{{ t.name }}"><thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in t.rows %}<tr>{% for cell in row %}<td{% if t.numeric[loop.index0] %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% if t.more %}<p class="desc">… and {{ t.more }} more (fleetmedic report)</p>{% endif %}
{% else %}<p class="empty">none in this period</p>{% endif %}{% endfor %}
{% else %}<p class="empty">no trend report yet: trigger the <a href="{{ airflow }}/dags/incident_trends" target="_top">incident_trends</a> DAG</p>{% endif %}
</body></html>
"""

_UNAUTHENTICATED = """<!doctype html><html><head><meta charset="utf-8"><title>fleetmedic: sign in</title></head>
<body style="font-family: system-ui, sans-serif; margin: 2rem"><h1>fleetmedic</h1>
<p>{{ detail }}: this page is behind Airflow's login.</p><p><a href="{{ login }}" target="_top">Sign in to Airflow</a></p>
</body></html>"""

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_page = _env.from_string(_PAGE)
_signin = _env.from_string(_UNAUTHENTICATED)

PAGE_INCIDENTS = 100


def create_app() -> FastAPI:
    """The FastAPI app the plugin mounts at URL_PREFIX."""
    app = FastAPI(title="fleetmedic", description="The fleetmedic page inside Airflow", docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        wants_html = "text/html" in request.headers.get("accept", "")
        if wants_html and exc.status_code in (401, 403):
            try:
                login = _auth_manager().get_url_login(next_url=str(request.url))
            except Exception:
                login = "/"
            body = _signin.render(detail=str(exc.detail), login=login)
            return HTMLResponse(body, status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, user: Any = Depends(viewer), done: str | None = None,
             sig: str | None = None) -> HTMLResponse:
        from fleetmedic.reports.render import table_context

        ctx = _page_context(ops_dsn())
        now = ctx["status"]["at"]
        airflow = _airflow_base()
        incidents = []
        for i in ctx["status"]["incidents"]["most_urgent"][:PAGE_INCIDENTS]:
            incidents.append({**i, "age": _age(i["opened_at"], now), "run_link": run_link(i, airflow),
                              "run_id": i.get("owner_run_id") or f"incident-{i['id']}"})
        breakers = [{**b, "since": _age(b.get("changed_at"), now) if b.get("changed_at") else ""}
                    for b in ctx["status"]["breakers"]]
        report = ctx["report"]
        operator_ = may_operate(user)
        body = _page.render(
            user=user.get_name(), actor=actor_of(user), operator=operator_,
            csrf=csrf_token(user.get_name()) if operator_ else "",
            now=f"{now:%Y-%m-%d %H:%M}", base=request.scope.get("root_path", URL_PREFIX).rstrip("/"),
            airflow=airflow, done=done if done and sig and hmac.compare_digest(sig, _sign(done)) else None,
            s=ctx["status"], incidents=incidents,
            more_incidents=max(0, ctx["status"]["incidents"]["active"] - len(incidents)),
            breakers=breakers, ignore_choices=list(IGNORE_CHOICES), report=report, charts=ctx["charts"],
            tables=table_context(report, limit=10) if report is not None else [],
        )
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/status")
    def api_status(user: Any = Depends(viewer)) -> JSONResponse:
        from fleetmedic.reports.status import fleet_status

        snapshot = fleet_status(ops_dsn(), limit=PAGE_INCIDENTS)
        return JSONResponse(_jsonable(snapshot))

    @app.get("/charts/{run_id}/{name}.png")
    def chart(run_id: int, name: str, user: Any = Depends(viewer)) -> Response:
        from fleetmedic.reports.trends import chart_png

        png = chart_png(ops_dsn(), run_id, name)
        if png is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no chart {name} in report run {run_id}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/incidents/{incident_id}/action")
    def incident_action(
        request: Request, incident_id: int, action: str = Form(...), reason: str = Form(...),
        csrf: str | None = Form(None, alias=CSRF_FIELD), user: Any = Depends(operator),
    ) -> Response:
        _check_csrf(request, user, csrf)
        message = _act_on_incident(incident_id, action, reason, actor_of(user))
        log.info("fleetmedic page: %s", message)
        return _after(request, message)

    @app.post("/breakers/{name}/reset")
    def breaker_reset(
        request: Request, name: str, reason: str = Form(...),
        csrf: str | None = Form(None, alias=CSRF_FIELD), user: Any = Depends(operator),
    ) -> Response:
        _check_csrf(request, user, csrf)
        message = _reset_breaker(name, reason, actor_of(user))
        log.info("fleetmedic page: %s", message)
        return _after(request, message)

    return app


def _after(request: Request, message: str) -> Response:
    if request.headers.get("authorization", "").lower().startswith("bearer ") or \
            "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"done": message})
    base = request.scope.get("root_path", URL_PREFIX).rstrip("/")
    return RedirectResponse(f"{base}/?done={quote(message)}&sig={_sign(message)}",
                            status_code=status.HTTP_303_SEE_OTHER)


def _sign(message: str) -> str:
    """Only messages this app wrote are shown back after a redirect (no text injected through a link)."""
    return hmac.new(_secret(), f"fleetmedic-done:{message}".encode(), hashlib.sha256).hexdigest()[:32]


def _act_on_incident(incident_id: int, action: str, reason: str, actor: str) -> str:
    try:
        from fleetmedic.safety import overrides
    except ImportError as exc:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, "incident overrides need fleetmedic.safety") from exc
    from fleetmedic.incidents.lifecycle import IncidentError

    dsn = ops_dsn()
    try:
        if action == "ack":
            event = overrides.acknowledge(dsn, incident_id, actor=actor, reason=reason)
            return f"incident {incident_id}: acknowledged by {actor} (audit event {event.id})"
        if action.startswith("ignore:") and action.partition(":")[2] in IGNORE_CHOICES:
            until = datetime.now(UTC) + IGNORE_CHOICES[action.partition(":")[2]]
            inc = overrides.ignore(dsn, incident_id, actor=actor, reason=reason, until=until)
            return f"incident {incident_id}: ignored until {inc.ignored_until:%Y-%m-%d %H:%M} UTC by {actor}"
    except (overrides.OverrideError, IncidentError, ValueError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                        f"unknown action {action!r}: use ack or ignore:<{'|'.join(IGNORE_CHOICES)}>")


def _reset_breaker(name: str, reason: str, actor: str) -> str:
    try:
        from fleetmedic.safety import breakers
    except ImportError as exc:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, "breaker resets need fleetmedic.safety") from exc
    try:
        breaker = breakers.parse_breaker_name(name)
        redis_url = None
        try:
            from fleetmedic.airflow.connections import redis_url as conn_redis_url

            redis_url = conn_redis_url()
        except Exception:  # the window is also reset by window_since; Redis is a speed-up here
            redis_url = None
        change = breakers.reset(ops_dsn(), breaker, actor=actor, reason=reason, redis_url=redis_url)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    released = f"; released incidents {', '.join(map(str, change.released))}" if change.released else ""
    return f"{change.message} (by {actor}){released}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value
