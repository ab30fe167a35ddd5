"""`fleetmedic fleet import`: CSV and YAML inventories; a bad row names its line and field and imports nothing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import psycopg
import pytest
from helpers import query
from typer.testing import CliRunner

from fleetmedic.console.cli import app
from fleetmedic.inventory import get_resource
from fleetmedic.inventory_io import InventoryFileError, import_inventory

HEADER = "kind,name,role,host,port,server,primary,provider,address,attrs"
GOOD_CSV = [
    HEADER,
    "server,db-01,,10.0.0.5,,,,aws,i-0aaa0001,\"{\"\"region\"\": \"\"eu-west-1\"\"}\"",
    "server,db-02,,10.0.0.6,,,,aws,i-0aaa0002,",
    "postgres,orders,primary,10.0.0.5,5432,db-01,,,,",
    "postgres,orders-2,follower,10.0.0.6,5432,db-02,orders,,,",
    "redis,sessions,primary,10.0.0.5,6379,db-01,,,,",
]

GOOD_YAML = """\
servers:
  - {name: db-01, provider: aws, address: i-0aaa0001, host: 10.0.0.5, attrs: {region: eu-west-1}}
  - name: db-02
    provider: aws
    address: i-0aaa0002
resources:
  - {name: orders, kind: postgres, role: primary, server: db-01, host: 10.0.0.5, port: 5432}
  - name: orders-2
    kind: postgres
    role: follower
    primary: orders
    server: db-02
    host: 10.0.0.6
    port: 5432
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def csv_with(line: int, row: str) -> str:
    """GOOD_CSV with file line `line` (1 = header) replaced by `row`."""
    rows = list(GOOD_CSV)
    rows[line - 1] = row
    return "\n".join(rows) + "\n"


def counts(dsn: str) -> tuple[int, int]:
    (row,) = query(dsn, "SELECT (SELECT count(*) FROM servers) AS s, (SELECT count(*) FROM resources) AS r")
    return row["s"], row["r"]


def test_a_good_csv_imports_servers_as_server_resources_and_databases_on_them(ops_dsn, tmp_path):
    summary = import_inventory(ops_dsn, write(tmp_path, "fleet.csv", "\n".join(GOOD_CSV) + "\n"))

    assert summary.line().endswith("servers 2 new, 0 updated; resources 3 new, 0 updated")
    with psycopg.connect(ops_dsn) as conn:
        follower = get_resource(conn, "orders-2")
        primary = get_resource(conn, "orders")
        server_row = get_resource(conn, "db-01")
    assert (follower.role, follower.primary_id, follower.port) == ("follower", primary.id, 5432)
    assert follower.server is not None and (follower.server.name, follower.server.address) == ("db-02", "i-0aaa0002")
    assert primary.server is not None and primary.server.attrs == {"region": "eu-west-1"}
    assert (server_row.kind, server_row.port, server_row.host) == ("server", None, "10.0.0.5")
    assert counts(ops_dsn) == (2, 5)


def test_importing_again_updates_in_place(ops_dsn, tmp_path):
    path = write(tmp_path, "fleet.yaml", GOOD_YAML)
    import_inventory(ops_dsn, path)

    again = import_inventory(ops_dsn, write(tmp_path, "fleet.yaml", GOOD_YAML.replace("host: 10.0.0.6", "host: 10.9.9.9")))

    assert (again.servers_created, again.servers_updated, again.resources_created, again.resources_updated) == (
        0, 2, 0, 2)
    with psycopg.connect(ops_dsn) as conn:
        assert get_resource(conn, "orders-2").host == "10.9.9.9"
    assert counts(ops_dsn) == (2, 4)


COLUMNS = "kind, name, role, host, port, server, primary, provider, address, attrs, enabled"

BAD_CSV = [
    (4, "postgres,orders,primary,10.0.0.5,abc,db-01,,,,",
     "line 4, field 'port': 'abc' is not a port number (1-65535)"),
    (4, "postgres,orders,primary,10.0.0.5,70000,db-01,,,,",
     "line 4, field 'port': 70000 is not a port number (1-65535)"),
    (4, "postgres,orders,primary,,5432,db-01,,,,", "line 4, field 'host': is required"),
    (4, "mysql,orders,primary,10.0.0.5,3306,db-01,,,,",
     "line 4, field 'kind': 'mysql' is not a resource kind (kinds: postgres, redis, or server for a server)"),
    (4, "postgres,orders,leader,10.0.0.5,5432,db-01,,,,",
     "line 4, field 'role': 'leader' is not a role (roles: primary, follower, standalone)"),
    (5, "postgres,orders-2,follower,10.0.0.6,5432,db-02,,,,",
     "line 5, field 'primary': is required for a follower (the resource it replicates from)"),
    (4, "postgres,orders,primary,10.0.0.5,5432,db-01,sessions,,,",
     "line 4, field 'primary': only a follower has a primary (role is primary)"),
    (4, "postgres,orders db,primary,10.0.0.5,5432,db-01,,,,",
     "line 4, field 'name': 'orders db' is not a valid name (letters, digits, '.', '_' and '-', starting with a "
     "letter or digit, at most 63)"),
    (3, "server,db-02,,10.0.0.6,,,,aws,10.0.0.6,",
     "line 3, field 'address': an aws server's address is its EC2 instance id (i-...), not '10.0.0.6'"),
    (3, "server,db-02,,10.0.0.6,,,,local,db-02,",
     "line 3, field 'attrs': a local server needs attrs.dir (the directory holding its instances and console.log)"),
    (3, "server,db-02,,10.0.0.6,,,,gcp,db-02,",
     "line 3, field 'provider': 'gcp' is not a cloud provider (providers: aws, local)"),
    (2, "server,db-01,,10.0.0.5,,,,aws,i-0aaa0001,{region: eu-west-1}",
     "line 2, field 'attrs': is not a JSON object: Expecting property name enclosed in double quotes "
     "(write e.g. {\"region\": \"eu-west-1\"})"),
    (1, HEADER.replace("port", "prot"),
     f"line 1, field 'prot': is not a known column; did you mean 'port'? (columns: {COLUMNS})"),
    (1, HEADER.replace("kind,", ""), "line 1, field 'kind': column is missing from the header"),
    (4, "postgres,orders,primary,10.0.0.5,5432,db-01,,,,,,extra",
     "line 4: has 12 values but the header has 10 columns"),
    # Checked against the whole file and the inventory:
    (5, "postgres,orders-2,follower,10.0.0.6,5432,db-09,orders,,,",
     "line 5, field 'server': server 'db-09' is neither in this file nor in the inventory; add it under servers; "
     "did you mean 'db-02'?"),
    (5, "postgres,orders-2,follower,10.0.0.6,5432,db-02,order,,,",
     "line 5, field 'primary': 'order' is neither in this file nor in the inventory; did you mean 'orders'?"),
    (5, "postgres,orders-2,follower,10.0.0.6,5432,db-01,orders,,,",
     "line 5, field 'server': orders-2 and its primary orders are both on db-01; a follower must be on another "
     "server"),
    (5, "redis,orders-2,follower,10.0.0.6,6379,db-02,orders,,,",
     "line 5, field 'primary': 'orders' is a postgres; a redis follower needs a redis primary"),
    (6, "redis,orders,primary,10.0.0.5,6379,db-01,,,,",
     "line 6, field 'name': 'orders' is already defined on line 4 (servers and resources share one namespace)"),
    (6, "redis,db-02,primary,10.0.0.5,6379,db-01,,,,",
     "line 6, field 'name': 'db-02' is already defined on line 3 (servers and resources share one namespace)"),
]


@pytest.mark.parametrize(("line", "row", "message"), BAD_CSV, ids=[m.split(": ", 1)[0] + " " + m.split("'")[1]
                                                                   if "'" in m else m for _, _, m in BAD_CSV])
def test_a_bad_csv_row_names_its_line_and_field_and_imports_nothing(ops_dsn, tmp_path, line, row, message):
    path = write(tmp_path, "fleet.csv", csv_with(line, row))

    with pytest.raises(InventoryFileError) as caught:
        import_inventory(ops_dsn, path)

    assert str(caught.value) == f"{path} {message}"
    assert counts(ops_dsn) == (0, 0)


BAD_YAML = [
    (GOOD_YAML.replace("    port: 5432", "    prot: 5432"),
     ["line 8, field 'port': is required",
      "line 14, field 'prot': is not a field of a resource; did you mean 'port'? (fields: name, kind, role, host, "
      "port, server, primary, attrs, enabled)"]),
    (GOOD_YAML.replace("servers:", "server:"),
     ["line 1, field 'server': is not a section; the sections are servers and resources; did you mean 'servers'?"]),
    (GOOD_YAML.replace("    port: 5432", "    port: [5432]"),
     ["line 14, field 'port': [5432] is not a port number (1-65535)"]),
    (GOOD_YAML.replace("    address: i-0aaa0002", "    address: i-0aaa0002\n   bad indent: x"),
     ["line 6: is not valid YAML: expected <block end>, but found '<block mapping start>'"]),
    ("- just\n- a list\n", ["line 1: must be a mapping with 'servers:' and/or 'resources:' lists"]),
]


@pytest.mark.parametrize(("text", "messages"), BAD_YAML, ids=["unknown-field", "unknown-section", "port-list",
                                                              "bad-yaml", "not-a-mapping"])
def test_a_bad_yaml_entry_names_the_line_of_the_field_and_imports_nothing(ops_dsn, tmp_path, text, messages):
    path = write(tmp_path, "fleet.yaml", text)

    with pytest.raises(InventoryFileError) as caught:
        import_inventory(ops_dsn, path)

    assert str(caught.value).splitlines() == [f"{path} {m}" for m in messages]
    assert counts(ops_dsn) == (0, 0)


def test_every_bad_row_is_reported_at_once(ops_dsn, tmp_path):
    text = csv_with(4, "postgres,orders,primary,10.0.0.5,abc,db-01,,,,").replace(
        "redis,sessions,primary,10.0.0.5,6379", "redis,sessions,primary,,6379")
    path = write(tmp_path, "fleet.csv", text)

    with pytest.raises(InventoryFileError) as caught:
        import_inventory(ops_dsn, path)

    assert [str(p) for p in caught.value.problems] == [
        "line 4, field 'port': 'abc' is not a port number (1-65535)",
        "line 6, field 'host': is required",
    ]


def test_a_row_that_clashes_with_the_inventory_imports_nothing_not_even_the_good_rows(ops_dsn, tmp_path):
    query(ops_dsn, "INSERT INTO resources (name, kind, role, host, port) VALUES "
                   "('db-02', 'postgres', 'primary', '10.1.1.1', 5432)")
    path = write(tmp_path, "fleet.csv", "\n".join(GOOD_CSV) + "\n")

    with pytest.raises(InventoryFileError) as caught:
        import_inventory(ops_dsn, path)

    assert str(caught.value) == (f"{path} line 3, field 'name': 'db-02' is a postgres resource in the inventory; "
                                 "a server cannot have its name")
    assert counts(ops_dsn) == (0, 1)


def test_a_follower_may_name_a_primary_already_in_the_inventory(ops_dsn, tmp_path):
    import_inventory(ops_dsn, write(tmp_path, "first.csv", "\n".join(GOOD_CSV[:4]) + "\n"))

    summary = import_inventory(ops_dsn, write(tmp_path, "second.yaml", textwrap.dedent("""\
        resources:
          - {name: orders-3, kind: postgres, role: follower, primary: orders, server: db-02, host: h, port: 5433}
        """)))

    assert (summary.resources_created, summary.resources_updated) == (1, 0)
    with psycopg.connect(ops_dsn) as conn:
        assert get_resource(conn, "orders-3").primary_id == get_resource(conn, "orders").id


def test_cli_import_prints_every_problem_and_exits_1_and_0_when_good(ops_dsn, tmp_path):
    runner = CliRunner()
    bad = write(tmp_path, "bad.csv", csv_with(4, "postgres,orders,primary,10.0.0.5,abc,db-01,,,,"))
    good = write(tmp_path, "good.csv", "\n".join(GOOD_CSV) + "\n")

    failed = runner.invoke(app, ["fleet", "import", str(bad), "--dsn", ops_dsn])
    done = runner.invoke(app, ["fleet", "import", str(good), "--dsn", ops_dsn, "--json"])
    missing = runner.invoke(app, ["fleet", "import", str(tmp_path / "nope.csv"), "--dsn", ops_dsn])

    def text(result) -> str:  # rich wraps long lines to the terminal width
        return " ".join(result.output.split())

    assert failed.exit_code == 1
    assert "line 4, field 'port': 'abc' is not a port number (1-65535)" in text(failed)
    assert "nothing was imported (1 problem(s))" in text(failed)
    assert done.exit_code == 0, done.output
    assert '"resources_created": 3' in done.output
    assert missing.exit_code == 2 and "nope.csv does not exist" in text(missing)
