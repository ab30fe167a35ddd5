"""Helpers every console command shares: errors, JSON output, where the ops database is."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from fleetmedic.config import load_settings

__all__ = ["DsnOption", "JsonOption", "console", "err", "fail", "ops_dsn", "print_json"]

console = Console()
err = Console(stderr=True)

DsnOption = typer.Option(None, "--dsn", help="ops database DSN (default: FLEETMEDIC_OPS_DSN or .local/demo.env)")
JsonOption = typer.Option(False, "--json", help="print JSON for scripts")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error and exit: 1 for errors, 2 for usage mistakes."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def ops_dsn(dsn: str | None) -> str:
    if dsn:
        return dsn
    try:
        return load_settings().ops_dsn
    except RuntimeError as exc:
        fail(str(exc))


def airflow_client() -> Any:
    """An AirflowClient from AIRFLOW_URL / AIRFLOW_USER / AIRFLOW_PASSWORD (or .local/demo.env)."""
    from fleetmedic.airflow_api import AirflowClient

    try:
        settings = load_settings()
    except RuntimeError as exc:
        fail(str(exc))
    if not (settings.airflow_url and settings.airflow_user and settings.airflow_password):
        fail("fleetmedic does not know where Airflow is: set AIRFLOW_URL, AIRFLOW_USER and AIRFLOW_PASSWORD, "
             "or run `make demo`, which writes them to .local/demo.env")
    return AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if hasattr(value, "total_seconds"):
        return value.total_seconds()
    return str(value)


def print_json(rows: Any) -> None:
    print(json.dumps(rows, default=_jsonable, indent=2))
