"""The ops database: connections and ordered schema migrations."""

from __future__ import annotations

from fleetmedic.db.connect import OpsDatabaseUnavailable, connect, connection, redact_dsn
from fleetmedic.db.migrate import MigrationError, migrate, status

__all__ = [
    "MigrationError",
    "OpsDatabaseUnavailable",
    "connect",
    "connection",
    "migrate",
    "redact_dsn",
    "status",
]
