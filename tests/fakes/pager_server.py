"""A local HTTP server that answers as PagerDuty's Events API v2 and Slack's incoming webhooks document.

PagerDuty (Events API v2, POST /v2/enqueue): 202 {"status": "success", "message": "Event processed",
"dedup_key": ...} for a valid event; 400 {"status": "invalid event", "message": "Event object is
invalid", "errors": [...]} when required fields are missing; 429 when rate limited; 5xx on its own
trouble. Slack (POST /services/...): 200 "ok"; 400 "invalid_payload"; 404 "no_service"; 429 with
Retry-After. A script of forced answers (`fail_next`) lets a test make it fail, then recover.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PD_ACTIONS = {"trigger", "acknowledge", "resolve"}
_PD_SEVERITIES = {"critical", "error", "warning", "info"}


class FakePagerServer:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []  # accepted PagerDuty events
        self.slack_messages: list[dict[str, Any]] = []
        self.requests = 0
        self.forced: deque[tuple[int, dict[str, str]]] = deque()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                return

            def _answer(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with server._lock:
                    server.requests += 1
                    forced = server.forced.popleft() if server.forced else None
                if forced is not None:
                    code, headers = forced
                    self._answer(code, {"status": "error", "message": f"forced {code}"}, headers)
                    return
                if self.path == "/v2/enqueue":
                    self._pagerduty(raw)
                elif self.path.startswith("/services/"):
                    self._slack(raw)
                else:
                    self._answer(404, {"message": "not found"})

            def _pagerduty(self, raw: bytes) -> None:
                try:
                    event = json.loads(raw)
                except ValueError:
                    self._answer(400, {"status": "invalid event", "message": "Event object is invalid",
                                       "errors": ["Body is not valid JSON"]})
                    return
                errors = []
                if not isinstance(event.get("routing_key"), str) or len(event["routing_key"]) != 32:
                    errors.append("'routing_key' is invalid (must be a 32-character integration key)")
                if event.get("event_action") not in _PD_ACTIONS:
                    errors.append("'event_action' is invalid (must be one of trigger, acknowledge, resolve)")
                if event.get("event_action") == "trigger":
                    payload = event.get("payload") or {}
                    for field in ("summary", "source", "severity"):
                        if not payload.get(field):
                            errors.append(f"'payload.{field}' is missing or blank")
                    if payload.get("severity") and payload["severity"] not in _PD_SEVERITIES:
                        errors.append("'payload.severity' is invalid")
                elif not event.get("dedup_key"):
                    errors.append("'dedup_key' is required for acknowledge and resolve")
                if errors:
                    self._answer(400, {"status": "invalid event", "message": "Event object is invalid",
                                       "errors": errors})
                    return
                with server._lock:
                    server.events.append(event)
                self._answer(202, {"status": "success", "message": "Event processed",
                                   "dedup_key": event.get("dedup_key")})

            def _slack(self, raw: bytes) -> None:
                try:
                    message = json.loads(raw)
                except ValueError:
                    self._answer(400, b"invalid_payload")
                    return
                if not message.get("text") and not message.get("blocks"):
                    self._answer(400, b"no_text")
                    return
                with server._lock:
                    server.slack_messages.append(message)
                self._answer(200, b"ok")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, times: int, code: int, headers: dict[str, str] | None = None) -> None:
        for _ in range(times):
            self.forced.append((code, headers or {}))

    def __enter__(self) -> FakePagerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
