"""Inventory beyond the demo fleet: import servers and resources from CSV or YAML, or discover them in AWS.

Everything goes through one plan: parse (or discover) entries, validate every one of them against
the file and the inventory (each problem names the line and the field), and only when nothing is
wrong write them all in one transaction. A bad row imports nothing.

YAML::

    servers:
      - {name: db-01, provider: aws, address: i-0abc123, host: 10.0.0.5, attrs: {region: eu-west-1}}
    resources:
      - {name: orders, kind: postgres, role: primary, server: db-01, host: 10.0.0.5, port: 5432}
      - {name: orders-2, kind: postgres, role: follower, primary: orders, server: db-02, host: 10.0.0.6, port: 5432}

CSV (one header line; `kind` = server rows define servers, postgres/redis rows define resources;
`attrs` is a JSON object)::

    kind,name,role,host,port,server,primary,provider,address,attrs
    server,db-01,,10.0.0.5,,,,aws,i-0abc123,"{""region"": ""eu-west-1""}"
    postgres,orders,primary,10.0.0.5,5432,db-01,,,,
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

__all__ = [
    "CSV_COLUMNS",
    "Discovery",
    "ImportSummary",
    "InventoryFileError",
    "InventoryPlan",
    "Problem",
    "ResourceEntry",
    "ServerEntry",
    "apply_plan",
    "discover_aws",
    "import_inventory",
    "parse_inventory_file",
    "validate_plan",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DB_KINDS = ("postgres", "redis")
ROLES = ("primary", "follower", "standalone")
CSV_COLUMNS = ("kind", "name", "role", "host", "port", "server", "primary", "provider", "address", "attrs",
               "enabled")
SERVER_FIELDS = ("name", "provider", "address", "host", "attrs")
RESOURCE_FIELDS = ("name", "kind", "role", "host", "port", "server", "primary", "attrs", "enabled")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Problem:
    where: str  # "line 4", or where a discovered entry came from ("ec2 instance i-0abc")
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}, field '{self.field}': {self.message}" if self.field else f"{self.where}: {self.message}"


class InventoryFileError(ValueError):
    """The input is invalid; nothing was imported. `str()` is one line per problem."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source} {p}" for p in problems))


@dataclass
class ServerEntry:
    name: str
    provider: str
    address: str | None
    host: str
    attrs: dict[str, Any]
    where: str


@dataclass
class ResourceEntry:
    name: str
    kind: str
    role: str
    host: str
    port: int
    server: str | None
    primary: str | None
    attrs: dict[str, Any]
    enabled: bool
    where: str


@dataclass
class InventoryPlan:
    source: str
    servers: list[ServerEntry] = field(default_factory=list)
    resources: list[ResourceEntry] = field(default_factory=list)


@dataclass
class ImportSummary:
    source: str
    servers_created: int = 0
    servers_updated: int = 0
    resources_created: int = 0
    resources_updated: int = 0

    def line(self) -> str:
        return (f"{self.source}: servers {self.servers_created} new, {self.servers_updated} updated; "
                f"resources {self.resources_created} new, {self.resources_updated} updated")


# -- reading files ----------------------------------------------------------------------------

@dataclass
class _Row:
    where: str
    section: str  # servers | resources
    values: dict[str, Any]
    key_where: dict[str, str] = field(default_factory=dict)  # field -> "line N" where it is written

    def at(self, name: str) -> str:
        return self.key_where.get(name, self.where)


class _Located(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line = 0
    key_lines: dict[str, int] = {}  # replaced per instance


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_located(loader: _LineLoader, node: yaml.MappingNode) -> _Located:
    value = _Located(loader.construct_mapping(node, deep=True))
    value.line = node.start_mark.line + 1
    value.key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return value


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _yaml_rows(text: str, problems: list[Problem]) -> list[_Row]:
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        problems.append(Problem(where, None, f"is not valid YAML: {getattr(exc, 'problem', None) or exc}"))
        return []
    if doc is None:
        return []
    if not isinstance(doc, dict):
        problems.append(Problem("line 1", None, "must be a mapping with 'servers:' and/or 'resources:' lists"))
        return []
    rows: list[_Row] = []
    for key in doc:
        if key not in ("servers", "resources"):
            line = doc.key_lines.get(key, 1) if isinstance(doc, _Located) else 1
            problems.append(Problem(f"line {line}", str(key), "is not a section; the sections are servers and "
                                                              f"resources{_suggest(str(key), ('servers', 'resources'))}"))
    for section in ("servers", "resources"):
        items = doc.get(section) or []
        sline = doc.key_lines.get(section, 1) if isinstance(doc, _Located) else 1
        if not isinstance(items, list):
            problems.append(Problem(f"line {sline}", section, "must be a list of mappings (one per entry)"))
            continue
        for i, item in enumerate(items):
            if not isinstance(item, _Located):
                problems.append(Problem(f"line {sline}", section, f"entry #{i + 1} must be a mapping, "
                                                                   f"not {type(item).__name__}"))
                continue
            rows.append(_Row(f"line {item.line}", section, {str(k): _plain(v) for k, v in item.items()},
                             {str(k): f"line {n}" for k, n in item.key_lines.items()}))
    return rows


def _csv_rows(text: str, problems: list[Problem]) -> list[_Row]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        return []
    reader.fieldnames = header
    for col in header:
        if col not in CSV_COLUMNS:
            problems.append(Problem("line 1", col, f"is not a known column{_suggest(col, CSV_COLUMNS)} "
                                                   f"(columns: {', '.join(CSV_COLUMNS)})"))
    for required in ("kind", "name"):
        if required not in header:
            problems.append(Problem("line 1", required, "column is missing from the header"))
    if problems:
        return []
    rows: list[_Row] = []
    for raw in reader:
        where = f"line {reader.line_num}"
        if None in raw:
            problems.append(Problem(where, None, f"has {len(header) + len(raw[None])} values but the header has "
                                                 f"{len(header)} columns"))
            continue
        values = {k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()}
        if not any(values.values()) or str(values.get("kind") or "").startswith("#"):
            continue  # blank or commented-out line
        values = {k: v for k, v in values.items() if v not in (None, "")}
        section = "servers" if values.get("kind") == "server" else "resources"
        if section == "servers":
            values.pop("kind")
        rows.append(_Row(where, section, values))
    return rows


def parse_inventory_file(path: Path | str) -> tuple[InventoryPlan, list[Problem]]:
    """Parse a .csv or .yaml/.yml inventory file into a plan (plus the problems found on the way)."""
    path = Path(path)
    problems: list[Problem] = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryFileError(str(path), [Problem("(file)", None, f"cannot be read: {exc.strerror}")]) from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(text, problems)
    elif suffix in (".yaml", ".yml"):
        rows = _yaml_rows(text, problems)
    else:
        raise InventoryFileError(str(path), [Problem("(file)", None, f"has extension {suffix or '(none)'!r}; "
                                                                      "use .csv, .yaml or .yml")])
    plan = InventoryPlan(str(path))
    for row in rows:
        entry = _entry(row, problems)
        if isinstance(entry, ServerEntry):
            plan.servers.append(entry)
        elif isinstance(entry, ResourceEntry):
            plan.resources.append(entry)
    problems.sort(key=_line_of)  # stable: a row's problems stay in field order
    return plan, problems


def _line_of(problem: Problem) -> int:
    m = re.match(r"line (\d+)", problem.where)
    return int(m.group(1)) if m else 0


# -- one row -> one entry ---------------------------------------------------------------------

def _text(row: _Row, name: str, problems: list[Problem], *, required: bool = False) -> str | None:
    value = row.values.get(name)
    if value is None or value == "":
        if required:
            problems.append(Problem(row.at(name), name, "is required"))
        return None
    if isinstance(value, dict | list):
        problems.append(Problem(row.at(name), name, f"must be text, not a {type(value).__name__}"))
        return None
    return str(value)


def _attrs(row: _Row, problems: list[Problem]) -> dict[str, Any]:
    value = row.values.get("attrs")
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            problems.append(Problem(row.at("attrs"), "attrs", f"is not a JSON object: {exc.msg} "
                                                              '(write e.g. {"region": "eu-west-1"})'))
            return {}
    if not isinstance(value, dict):
        problems.append(Problem(row.at("attrs"), "attrs", f"must be a mapping, not {type(value).__name__}"))
        return {}
    return dict(value)


def _name(row: _Row, problems: list[Problem]) -> str | None:
    name = _text(row, "name", problems, required=True)
    if name is not None and not NAME_RE.match(name):
        problems.append(Problem(row.at("name"), "name", f"{name!r} is not a valid name (letters, digits, '.', "
                                                        "'_' and '-', starting with a letter or digit, at most 63)"))
        return None
    return name


def _unknown_fields(row: _Row, allowed: tuple[str, ...], problems: list[Problem]) -> None:
    for key in row.values:
        if key not in allowed:
            what = "a server" if row.section == "servers" else "a resource"
            problems.append(Problem(row.at(key), key, f"is not a field of {what}{_suggest(key, allowed)} "
                                                      f"(fields: {', '.join(allowed)})"))


def _entry(row: _Row, problems: list[Problem]) -> ServerEntry | ResourceEntry | None:
    from fleetmedic.cloud import known_providers

    before = len(problems)
    name = _name(row, problems)
    attrs = _attrs(row, problems)
    if row.section == "servers":
        _unknown_fields(row, SERVER_FIELDS, problems)
        provider = _text(row, "provider", problems) or "local"
        providers = known_providers()
        if provider not in providers:
            problems.append(Problem(row.at("provider"), "provider", f"{provider!r} is not a cloud provider "
                                                                     f"(providers: {', '.join(providers)})"))
        address = _text(row, "address", problems)
        if provider == "aws" and not (address or "").startswith("i-"):
            problems.append(Problem(row.at("address"), "address", "an aws server's address is its EC2 instance id "
                                                                   f"(i-...), not {address!r}"))
        if provider == "local" and not attrs.get("dir"):
            problems.append(Problem(row.at("attrs"), "attrs", "a local server needs attrs.dir (the directory "
                                                              "holding its instances and console.log)"))
        host = _text(row, "host", problems) or address or name
        if len(problems) > before or name is None:
            return None
        return ServerEntry(name, provider, address, str(host), attrs, row.where)
    _unknown_fields(row, RESOURCE_FIELDS, problems)
    kind = _text(row, "kind", problems, required=True)
    if kind is not None and kind not in DB_KINDS:
        problems.append(Problem(row.at("kind"), "kind", f"{kind!r} is not a resource kind (kinds: "
                                                        f"{', '.join(DB_KINDS)}, or server for a server)"))
    role = _text(row, "role", problems) or "primary"
    if role not in ROLES:
        problems.append(Problem(row.at("role"), "role", f"{role!r} is not a role (roles: {', '.join(ROLES)})"))
    host = _text(row, "host", problems, required=True)
    port = _port(row, problems)
    primary = _text(row, "primary", problems)
    if role == "follower" and primary is None:
        problems.append(Problem(row.at("primary"), "primary", "is required for a follower (the resource it "
                                                              "replicates from)"))
    if role in ("primary", "standalone") and primary is not None:
        problems.append(Problem(row.at("primary"), "primary", f"only a follower has a primary (role is {role})"))
    enabled = _enabled(row, problems)
    if len(problems) > before or name is None or kind is None or host is None or port is None:
        return None
    return ResourceEntry(name, kind, role, host, port, _text(row, "server", problems), primary, attrs, enabled,
                         row.where)


def _port(row: _Row, problems: list[Problem]) -> int | None:
    value = row.values.get("port")
    if value is None or value == "":
        problems.append(Problem(row.at("port"), "port", "is required"))
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        problems.append(Problem(row.at("port"), "port", f"{value!r} is not a port number (1-65535)"))
        return None
    port = int(value)
    if not 1 <= port <= 65535:
        problems.append(Problem(row.at("port"), "port", f"{port} is not a port number (1-65535)"))
        return None
    return port


def _enabled(row: _Row, problems: list[Problem]) -> bool:
    value = row.values.get("enabled")
    if value is None or value == "" or value is True:
        return True
    if value is False:
        return False
    text = str(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    problems.append(Problem(row.at("enabled"), "enabled", f"{value!r} is not true or false"))
    return True


# -- validation against the file and the inventory --------------------------------------------

@dataclass(frozen=True)
class _Existing:
    id: int
    kind: str
    server: str | None


def _existing(conn: psycopg.Connection) -> tuple[dict[str, _Existing], dict[str, int]]:
    rows = conn.execute(
        "SELECT r.id, r.name, r.kind, s.name FROM resources r LEFT JOIN servers s ON s.id = r.server_id").fetchall()
    resources = {str(r[1]): _Existing(int(r[0]), str(r[2]), r[3]) for r in rows}
    servers = {str(r[1]): int(r[0]) for r in conn.execute("SELECT id, name FROM servers").fetchall()}
    return resources, servers


def validate_plan(conn: psycopg.Connection, plan: InventoryPlan) -> list[Problem]:
    """Cross-entry and inventory checks: duplicates, name clashes, servers and primaries that exist."""
    problems: list[Problem] = []
    existing, existing_servers = _existing(conn)
    defined: dict[str, str] = {}
    entries: list[ServerEntry | ResourceEntry] = [*plan.servers, *plan.resources]
    for entry in entries:
        if entry.name in defined:
            problems.append(Problem(entry.where, "name", f"{entry.name!r} is already defined on {defined[entry.name]} "
                                                         "(servers and resources share one namespace)"))
        else:
            defined[entry.name] = entry.where
    file_servers = {s.name for s in plan.servers}
    file_resources: dict[str, ResourceEntry] = {}
    for entry in plan.resources:
        file_resources.setdefault(entry.name, entry)  # a duplicate is reported above; check against the first
    for s in plan.servers:
        old = existing.get(s.name)
        if old is not None and old.kind != "server":
            problems.append(Problem(s.where, "name", f"{s.name!r} is a {old.kind} resource in the inventory; "
                                                     "a server cannot have its name"))
    for r in plan.resources:
        old = existing.get(r.name)
        if old is not None and old.kind != r.kind:
            problems.append(Problem(r.where, "kind", f"{r.name!r} is a {old.kind} in the inventory; changing "
                                                     f"it to {r.kind} is not supported (rename it)"))
        if r.server is not None and r.server not in file_servers and r.server not in existing_servers:
            problems.append(Problem(r.where, "server", f"server {r.server!r} is neither in this file nor in the "
                                                       "inventory; add it under servers"
                                                       f"{_suggest(r.server, [*file_servers, *existing_servers])}"))
        if r.primary is None:
            continue
        primary = file_resources.get(r.primary)
        p_kind = primary.kind if primary else (existing[r.primary].kind if r.primary in existing else None)
        p_server = primary.server if primary else (existing[r.primary].server if r.primary in existing else None)
        if p_kind is None:
            problems.append(Problem(r.where, "primary", f"{r.primary!r} is neither in this file nor in the "
                                                        f"inventory{_suggest(r.primary, file_resources)}"))
        elif p_kind != r.kind:
            problems.append(Problem(r.where, "primary", f"{r.primary!r} is a {p_kind}; a {r.kind} follower needs "
                                                        f"a {r.kind} primary"))
        elif r.primary == r.name:
            problems.append(Problem(r.where, "primary", "a resource cannot be its own primary"))
        elif _replication_cycle(r, file_resources):
            problems.append(Problem(r.where, "primary", f"{r.name} -> {r.primary} leads back to {r.name}; "
                                                        "replication cannot go in a circle"))
        elif r.server is not None and p_server == r.server:
            problems.append(Problem(r.where, "server", f"{r.name} and its primary {r.primary} are both on "
                                                       f"{r.server}; a follower must be on another server"))
    return problems


def _replication_cycle(r: ResourceEntry, in_file: Mapping[str, ResourceEntry]) -> bool:
    seen = {r.name}
    current = in_file.get(r.primary or "")
    while current is not None:
        if current.name in seen:
            return True
        seen.add(current.name)
        current = in_file.get(current.primary or "")
    return False


# -- writing ----------------------------------------------------------------------------------

_UPSERT_RESOURCE = """
INSERT INTO resources (name, kind, role, host, port, server_id, primary_id, attrs, enabled)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, role = excluded.role, host = excluded.host,
    port = excluded.port, server_id = excluded.server_id, primary_id = excluded.primary_id,
    attrs = excluded.attrs, enabled = excluded.enabled, updated_at = now()
RETURNING id
"""


def _in_dependency_order(resources: list[ResourceEntry]) -> list[ResourceEntry]:
    """Primaries before their followers (a follower of a follower after both)."""
    by_name = {r.name: r for r in resources}
    ordered: list[ResourceEntry] = []
    placed: set[str] = set()

    def place(r: ResourceEntry, seen: frozenset[str]) -> None:
        if r.name in placed or r.name in seen:
            return
        if r.primary in by_name:
            place(by_name[r.primary], seen | {r.name})
        placed.add(r.name)
        ordered.append(r)

    for r in resources:
        place(r, frozenset())
    return ordered


def apply_plan(conn: psycopg.Connection, plan: InventoryPlan) -> ImportSummary:
    """Validate and write the whole plan in one transaction; InventoryFileError (and nothing written) if bad."""
    from fleetmedic.inventory import upsert_server, upsert_server_resource

    summary = ImportSummary(plan.source)
    with conn.transaction():
        # Serialise imports: validation reads the inventory that the writes below depend on.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('fleetmedic:inventory_import'))")
        problems = validate_plan(conn, plan)
        if problems:
            raise InventoryFileError(plan.source, problems)
        existing, existing_servers = _existing(conn)
        server_ids = dict(existing_servers)
        for s in plan.servers:
            created = s.name not in server_ids
            server_ids[s.name] = upsert_server(conn, name=s.name, provider=s.provider, address=s.address,
                                               attrs=s.attrs)
            upsert_server_resource(conn, server_id=server_ids[s.name], name=s.name, host=s.host)
            summary.servers_created += created
            summary.servers_updated += not created
        ids = {name: e.id for name, e in existing.items()}
        for r in _in_dependency_order(plan.resources):
            created = r.name not in ids
            row = conn.execute(_UPSERT_RESOURCE, (
                r.name, r.kind, r.role, r.host, r.port, server_ids.get(r.server) if r.server else None,
                ids.get(r.primary) if r.primary else None, json.dumps(r.attrs), r.enabled)).fetchone()
            assert row is not None
            ids[r.name] = int(row[0])
            summary.resources_created += created
            summary.resources_updated += not created
    return summary


def import_inventory(dsn: str, path: Path | str) -> ImportSummary:
    """Parse, validate and import a CSV or YAML inventory file: everything, or nothing and every problem."""
    plan, problems = parse_inventory_file(path)
    if problems:
        raise InventoryFileError(plan.source, problems)
    with psycopg.connect(dsn) as conn:
        return apply_plan(conn, plan)


# -- AWS discovery ----------------------------------------------------------------------------

@dataclass
class Discovery:
    plan: InventoryPlan
    skipped: list[str] = field(default_factory=list)  # found but not imported, and why


def _tags(tag_list: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in (tag_list or [])}


def _tagged(tags: Mapping[str, str], tag: tuple[str, str]) -> bool:
    return tags.get(tag[0]) == tag[1]


def discover_aws(*, tag: tuple[str, str] = ("fleetmedic", "managed"), region: str | None = None,
                 session: Any = None, endpoint_url: str | None = None) -> Discovery:
    """EC2 instances (servers), RDS PostgreSQL instances and ElastiCache Redis groups carrying `tag`."""
    from fleetmedic.cloud.aws import AwsProvider

    aws = AwsProvider(session, region=region, endpoint_url=endpoint_url)
    ec2 = aws.client("ec2", region=region)
    region = region or ec2.meta.region_name
    found = Discovery(InventoryPlan(f"aws:{region}"))
    _discover_ec2(ec2, tag, region, found)
    _discover_rds(aws.client("rds", region=region), tag, region, found)
    _discover_elasticache(aws.client("elasticache", region=region), tag, region, found)
    return found


def _discover_ec2(ec2: Any, tag: tuple[str, str], region: str, found: Discovery) -> None:
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{tag[0]}", "Values": [tag[1]]}])
    for page in pages:
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                iid = inst["InstanceId"]
                state = inst.get("State", {}).get("Name")
                if state in ("terminated", "shutting-down"):
                    found.skipped.append(f"ec2 instance {iid}: {state}")
                    continue
                name = _tags(inst.get("Tags")).get("Name", "")
                if not NAME_RE.match(name) or any(s.name == name for s in found.plan.servers):
                    name = iid  # no usable Name tag, or two instances share one
                private_ip = inst.get("PrivateIpAddress")
                found.plan.servers.append(ServerEntry(
                    name, "aws", iid, private_ip or iid,
                    {"region": region, "instance_type": inst.get("InstanceType"), "private_ip": private_ip,
                     "availability_zone": inst.get("Placement", {}).get("AvailabilityZone"), "discovered": "aws"},
                    f"ec2 instance {iid}"))


def _discover_rds(rds: Any, tag: tuple[str, str], region: str, found: Discovery) -> None:
    instances = [d for page in rds.get_paginator("describe_db_instances").paginate()
                 for d in page.get("DBInstances", [])]
    tagged = {d["DBInstanceIdentifier"]: d for d in instances if _tagged(_tags(d.get("TagList")), tag)}
    for ident, d in tagged.items():
        where = f"rds instance {ident}"
        engine = d.get("Engine", "")
        if "postgres" not in engine:
            found.skipped.append(f"{where}: engine {engine} is not managed by fleetmedic (postgres and redis only)")
            continue
        endpoint = d.get("Endpoint") or {}
        if not endpoint.get("Address"):
            found.skipped.append(f"{where}: no endpoint yet (status {d.get('DBInstanceStatus')})")
            continue
        source = d.get("ReadReplicaSourceDBInstanceIdentifier")
        if source:
            source = source.rsplit(":db:", 1)[-1]
            if source not in tagged:
                found.skipped.append(f"{where}: a read replica of {source}, which does not carry the tag "
                                     f"{tag[0]}={tag[1]}; tag its primary too")
                continue
        found.plan.resources.append(ResourceEntry(
            ident, "postgres", "follower" if source else "primary", endpoint["Address"],
            int(endpoint.get("Port") or 5432), None, source,
            {"provider": "aws-rds", "arn": d.get("DBInstanceArn"), "region": region, "engine": engine,
             "instance_class": d.get("DBInstanceClass"), "dbname": d.get("DBName") or "postgres",
             "user": d.get("MasterUsername") or "postgres", "discovered": "aws"},
            True, where))


def _discover_elasticache(ec: Any, tag: tuple[str, str], region: str, found: Discovery) -> None:
    for page in ec.get_paginator("describe_replication_groups").paginate():
        for g in page.get("ReplicationGroups", []):
            gid = g["ReplicationGroupId"]
            where = f"elasticache replication group {gid}"
            tags = _tags(ec.list_tags_for_resource(ResourceName=g["ARN"]).get("TagList"))
            if not _tagged(tags, tag):
                continue
            if g.get("Engine", "redis") != "redis":
                found.skipped.append(f"{where}: engine {g.get('Engine')} is not managed by fleetmedic")
                continue
            groups = g.get("NodeGroups") or [{}]
            endpoint = g.get("ConfigurationEndpoint") or groups[0].get("PrimaryEndpoint") or {}
            if not endpoint.get("Address"):
                found.skipped.append(f"{where}: no primary or configuration endpoint yet (status {g.get('Status')})")
                continue
            found.plan.resources.append(ResourceEntry(
                gid, "redis", "primary", endpoint["Address"], int(endpoint.get("Port") or 6379), None, None,
                {"provider": "aws-elasticache", "arn": g.get("ARN"), "region": region,
                 "node_type": g.get("CacheNodeType"), "members": g.get("MemberClusters", []),
                 "discovered": "aws"},
                True, where))
    for page in ec.get_paginator("describe_cache_clusters").paginate(ShowCacheNodeInfo=True):
        for c in page.get("CacheClusters", []):
            if c.get("ReplicationGroupId"):
                continue  # a member of a replication group, registered as the group
            cid = c["CacheClusterId"]
            where = f"elasticache cluster {cid}"
            if not _tagged(_tags(ec.list_tags_for_resource(ResourceName=c["ARN"]).get("TagList")), tag):
                continue
            if c.get("Engine") != "redis":
                found.skipped.append(f"{where}: engine {c.get('Engine')} is not managed by fleetmedic")
                continue
            nodes = c.get("CacheNodes") or []
            endpoint = (nodes[0].get("Endpoint") if nodes else None) or {}
            if not endpoint.get("Address"):
                found.skipped.append(f"{where}: no node endpoint yet (status {c.get('CacheClusterStatus')})")
                continue
            found.plan.resources.append(ResourceEntry(
                cid, "redis", "standalone", endpoint["Address"], int(endpoint.get("Port") or 6379), None, None,
                {"provider": "aws-elasticache", "arn": c.get("ARN"), "region": region,
                 "node_type": c.get("CacheNodeType"), "discovered": "aws"},
                True, where))
