"""A small client for Airflow 3's public REST API (`/api/v2`), plain httpx, no Airflow import.

fleetmedic never touches Airflow's metadata database; the console, tests and benchmarks use this
instead. Verified against Airflow 3.3.2:

- Auth (SimpleAuthManager): `POST /auth/token` with JSON `{"username", "password"}` answers 201
  `{"access_token": "<jwt>"}`; send it as `Authorization: Bearer <jwt>`. Tokens expire
  (`[api_auth] jwt_expiration_time`, 24 h by default): an expired token gets 401 "Token Expired", a
  token the server cannot verify 403 "Invalid JWT token"; on either we log in again and retry once.
- Trigger: `POST /api/v2/dags/{dag_id}/dagRuns`. In 3.x `logical_date` is a REQUIRED key whose value
  may be null (a manual run with no logical date; `run_after` defaults to now). Several runs may
  therefore share no logical date; they are told apart by `dag_run_id`.
- `GET /api/v2/monitor/health` needs no token.
- Page sizes are capped by `[api] maximum_page_limit` (100).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

__all__ = ["TERMINAL_RUN_STATES", "AirflowApiError", "AirflowClient"]

TERMINAL_RUN_STATES = ("success", "failed")


class AirflowApiError(RuntimeError):
    """A REST call failed; the message names the method, URL, status code and Airflow's detail."""

    def __init__(self, message: str, status_code: int | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.url = url


def _q(value: str) -> str:
    return quote(value, safe="")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:1000]
    return str(body)[:500]


def _token_rejected(response: httpx.Response) -> bool:
    """Airflow answers 401 "Token Expired" for an expired token and 403 "Invalid JWT token" for one
    it cannot verify (e.g. signed with the JWT secret of an earlier instance); both mean "log in
    again", unlike a 403 for a permission the user lacks."""
    if response.status_code == 401:
        return True
    return response.status_code == 403 and "invalid jwt token" in _detail(response).lower()


class AirflowClient:
    """Talks to one Airflow api-server as one user. Usable as a context manager."""

    def __init__(self, base_url: str, user: str, password: str, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.user = user
        self._password = password
        self._token: str | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers={"Accept": "application/json"})

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"AirflowClient({self.base_url!r}, user={self.user!r})"

    # -- transport ------------------------------------------------------------------------------

    def login(self) -> str:
        """Get a fresh access token (POST /auth/token)."""
        url = f"{self.base_url}/auth/token"
        try:
            r = self._http.post("/auth/token", json={"username": self.user, "password": self._password})
        except httpx.HTTPError as exc:
            raise AirflowApiError(f"cannot reach Airflow at {url}: {exc}", url=url) from exc
        if r.status_code not in (200, 201):
            hint = " (wrong user or password?)" if r.status_code == 401 else ""
            raise AirflowApiError(
                f"login as {self.user!r} failed: POST {url} -> {r.status_code}{hint}: {_detail(r)}",
                r.status_code, url,
            )
        self._token = r.json()["access_token"]
        return self._token

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
        json: Any = None, ok: Iterable[int] = (200, 201, 204), auth: bool = True,
    ) -> Any:
        """One API call: returns the decoded JSON (None for empty bodies); raises AirflowApiError."""
        url = f"{self.base_url}{path}"
        ok = tuple(ok)
        for attempt in (1, 2):
            headers = {}
            if auth:
                if self._token is None:
                    self.login()
                headers["Authorization"] = f"Bearer {self._token}"
            try:
                r = self._http.request(method, path, params=params, json=json, headers=headers)
            except httpx.HTTPError as exc:
                raise AirflowApiError(f"{method} {url} failed: {type(exc).__name__}: {exc}", url=url) from exc
            if auth and attempt == 1 and _token_rejected(r):
                self._token = None
                continue
            break
        if r.status_code not in ok:
            raise AirflowApiError(f"{method} {url} -> {r.status_code}: {_detail(r)}", r.status_code, url)
        if not r.content:
            return None
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    # -- monitoring -----------------------------------------------------------------------------

    def health(self) -> dict:
        """`/api/v2/monitor/health`: metadatabase, scheduler, triggerer, dag_processor status."""
        return self.request("GET", "/api/v2/monitor/health", auth=False)

    def version(self) -> dict:
        return self.get("/api/v2/version")

    # -- DAGs -----------------------------------------------------------------------------------

    def list_dags(self, dag_id_pattern: str | None = None, limit: int = 100) -> list[dict]:
        """All DAGs (paging through), optionally filtered by a SQL LIKE pattern on dag_id."""
        dags: list[dict] = []
        offset = 0
        while True:
            page = self.get("/api/v2/dags", limit=limit, offset=offset, dag_id_pattern=dag_id_pattern)
            dags.extend(page["dags"])
            offset += len(page["dags"])
            if not page["dags"] or offset >= page.get("total_entries", 0):
                return dags

    def get_dag(self, dag_id: str) -> dict | None:
        """The DAG, or None if Airflow does not know it (not parsed yet)."""
        try:
            return self.get(f"/api/v2/dags/{_q(dag_id)}")
        except AirflowApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    def import_errors(self) -> list[dict]:
        """Current DAG import errors: dicts with filename, bundle_name, stack_trace, timestamp."""
        errors: list[dict] = []
        offset = 0
        while True:
            page = self.get("/api/v2/importErrors", limit=100, offset=offset)
            errors.extend(page["import_errors"])
            offset += len(page["import_errors"])
            if not page["import_errors"] or offset >= page.get("total_entries", 0):
                return errors

    def wait_for_dags(
        self, dag_ids: Sequence[str], timeout: float = 120, interval: float = 2, echo: bool = True,
        fail_on_import_errors: bool = True,
    ) -> dict[str, dict]:
        """Wait until every DAG in `dag_ids` is parsed, active and free of import errors.

        With `fail_on_import_errors`, raise as soon as an import error exists while some of the
        DAGs are still missing (waiting longer would not help), quoting the error.
        """
        t0 = time.monotonic()
        last_echo = -1e9
        while True:
            found = {d: self.get_dag(d) for d in dag_ids}
            missing = [d for d, v in found.items() if v is None or v.get("is_stale")]
            broken = [d for d, v in found.items() if v is not None and v.get("has_import_errors")]
            if not missing and not broken:
                if echo:
                    print(f"airflow: DAGs parsed after {time.monotonic() - t0:.1f}s: {', '.join(dag_ids)}", flush=True)
                return {d: v for d, v in found.items() if v is not None}
            errors = self.import_errors() if (missing or broken) else []
            elapsed = time.monotonic() - t0
            if (fail_on_import_errors and errors) or elapsed > timeout:
                detail = "\n".join(f"--- {e.get('filename')}\n{e.get('stack_trace', '').strip()}" for e in errors)
                why = "import errors" if errors else f"timeout after {timeout:.0f}s"
                raise AirflowApiError(
                    f"DAGs not ready at {self.base_url} ({why}): missing={missing} with_import_errors={broken}"
                    + (f"\nimport errors:\n{detail}" if detail else ""),
                    url=f"{self.base_url}/api/v2/dags",
                )
            if echo and elapsed - last_echo >= 10:
                last_echo = elapsed
                print(f"airflow: waiting for DAGs {missing + broken} to be parsed ({elapsed:.0f}s)", flush=True)
            time.sleep(interval)

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.request(
            "PATCH", f"/api/v2/dags/{_q(dag_id)}", params={"update_mask": "is_paused"},
            json={"is_paused": paused},
        )

    def unpause(self, dag_id: str) -> dict:
        return self.set_paused(dag_id, False)

    def pause(self, dag_id: str) -> dict:
        return self.set_paused(dag_id, True)

    # -- DAG runs -------------------------------------------------------------------------------

    def trigger(
        self, dag_id: str, run_id: str | None = None, conf: Mapping[str, Any] | None = None,
        logical_date: datetime | str | None = None, note: str | None = None,
    ) -> dict:
        """Start a manual run; returns the DAG run (its id is `dag_run_id`).

        `logical_date` None means "no logical date" (the Airflow 3 default for manual runs); a
        naive datetime is rejected by Airflow, so pass an aware one (or an ISO string with offset).
        """
        if isinstance(logical_date, datetime):
            if logical_date.tzinfo is None:
                raise ValueError("logical_date must be timezone-aware (Airflow rejects naive datetimes)")
            logical_date = logical_date.isoformat()
        body: dict[str, Any] = {"logical_date": logical_date, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        if note:
            body["note"] = note
        return self.request("POST", f"/api/v2/dags/{_q(dag_id)}/dagRuns", json=body)

    def get_run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def list_runs(
        self, dag_id: str, state: str | Sequence[str] | None = None, limit: int = 25, newest_first: bool = True,
    ) -> list[dict]:
        """Runs of a DAG (`~` for all DAGs), newest first, optionally only in the given state(s)."""
        params: dict[str, Any] = {"limit": limit, "order_by": "-id" if newest_first else "id"}
        if state:
            params["state"] = [state] if isinstance(state, str) else list(state)
        return self.request("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns", params=params)["dag_runs"]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 300, states: Sequence[str] = TERMINAL_RUN_STATES,
        interval: float = 1, echo: bool = True,
    ) -> dict:
        """Poll until the run reaches one of `states`; prints state and task-state changes."""
        t0 = time.monotonic()
        last_line = ""
        while True:
            run = self.get_run(dag_id, run_id)
            elapsed = time.monotonic() - t0
            if echo:
                tis = self.task_instances(dag_id, run_id) if run["state"] not in ("queued",) else []
                counts: dict[str, int] = {}
                for ti in tis:
                    counts[str(ti.get("state"))] = counts.get(str(ti.get("state")), 0) + 1
                line = f"run {dag_id}/{run_id}: {run['state']}" + (
                    f" tasks {dict(sorted(counts.items()))}" if counts else ""
                )
                if line != last_line:
                    print(f"airflow: [{elapsed:5.1f}s] {line}", flush=True)
                    last_line = line
            if run["state"] in states:
                return run
            if elapsed > timeout:
                raise AirflowApiError(
                    f"run {dag_id}/{run_id} at {self.base_url} still {run['state']!r} after {timeout:.0f}s "
                    f"(waiting for {list(states)})",
                    url=f"{self.base_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                )
            time.sleep(interval)

    def trigger_and_wait(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None,
        timeout: float = 300, echo: bool = True,
    ) -> dict:
        run = self.trigger(dag_id, run_id=run_id, conf=conf)
        return self.wait_for_run(dag_id, run["dag_run_id"], timeout=timeout, echo=echo)

    # -- task instances -------------------------------------------------------------------------

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Task instances of one run (task_id, map_index, state, try_number, start/end dates, ...)."""
        items: list[dict] = []
        offset = 0
        while True:
            page = self.get(
                f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances", limit=100, offset=offset,
            )
            items.extend(page["task_instances"])
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page.get("total_entries", 0):
                return items

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        """The task's log as text: one line per structured event, exceptions rendered below it."""
        data = self.get(
            f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/logs/{try_number}",
            map_index=map_index, full_content=True,
        )
        content = data.get("content") if isinstance(data, dict) else data
        if not isinstance(content, list):
            return str(content)
        lines = []
        for item in content:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            lines.append(" ".join(str(item[k]) for k in ("timestamp", "level", "event") if item.get(k)))
            for err in item.get("error_detail") or []:
                for frame in err.get("frames") or []:
                    lines.append(f"    {frame.get('filename')}:{frame.get('lineno')} in {frame.get('name')}")
                lines.append(f"    {err.get('exc_type')}: {err.get('exc_value')}")
        return "\n".join(lines)

    def clear_task(
        self, dag_id: str, run_id: str, task_ids: Sequence[str] | None = None, only_failed: bool = False,
        include_downstream: bool = False, dry_run: bool = False,
    ) -> list[dict]:
        """Clear task instances of one run so the scheduler runs them again; returns those cleared."""
        body: dict[str, Any] = {
            "dag_run_id": run_id, "dry_run": dry_run, "only_failed": only_failed,
            "include_downstream": include_downstream, "reset_dag_runs": True,
        }
        if task_ids:
            body["task_ids"] = list(task_ids)
        data = self.request("POST", f"/api/v2/dags/{_q(dag_id)}/clearTaskInstances", json=body)
        return data.get("task_instances", []) if isinstance(data, dict) else []

    # -- pools ----------------------------------------------------------------------------------

    def list_pools(self) -> list[dict]:
        """Every pool: name, slots, description, include_deferred, and slot usage (paging through)."""
        pools: list[dict] = []
        offset = 0
        while True:
            page = self.get("/api/v2/pools", limit=100, offset=offset)
            pools.extend(page["pools"])
            offset += len(page["pools"])
            if not page["pools"] or offset >= page.get("total_entries", 0):
                return pools

    def get_pool(self, name: str) -> dict | None:
        """The pool, or None if there is no such pool."""
        try:
            return self.get(f"/api/v2/pools/{_q(name)}")
        except AirflowApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    def create_pool(self, name: str, slots: int, description: str | None = None,
                    include_deferred: bool = False) -> dict:
        return self.request("POST", "/api/v2/pools", json={
            "name": name, "slots": slots, "description": description, "include_deferred": include_deferred})

    def update_pool(self, name: str, slots: int, description: str | None = None,
                    include_deferred: bool = False) -> dict:
        return self.request("PATCH", f"/api/v2/pools/{_q(name)}",
                            json={"pool": name, "slots": slots, "description": description,
                                  "include_deferred": include_deferred})

    def delete_pool(self, name: str) -> None:
        self.request("DELETE", f"/api/v2/pools/{_q(name)}")
