"""Validation of every spec value that reaches a remote command or SQL, and SQL quoting."""

from __future__ import annotations

import pytest

from pgrecovery.cluster.nodes import (
    A9sLayout,
    Node,
    run_id_for,
    validate_address,
    validate_backup_id,
    validate_deployment,
    validate_node_name,
    validate_nodes,
    validate_run_id,
)
from pgrecovery.cluster.psql import psql_argv, quote_ident, quote_literal, validate_dbname
from pgrecovery.errors import InvalidSpec

pytestmark = pytest.mark.unit

INJECTIONS = ["; rm -rf /", "$(reboot)", "`id`", "a'b", 'a"b', "a\nb", "a b", "", "../x"]
GUID = "de2fe9e4-6535-423d-8709-dca87df7985c"


@pytest.mark.parametrize("name", ["pg/0", "pg/12", "postgresql-ha_1/3", f"pg/{GUID}"])
def test_node_names_valid(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize("name", [*INJECTIONS, "pg", "pg/", "/0", "PG/0", "pg/0/1", "pg/-1"])
def test_node_names_invalid(name: str) -> None:
    with pytest.raises(InvalidSpec):
        validate_node_name(name)


@pytest.mark.parametrize(
    ("address", "normal"),
    [
        ("10.0.0.10", "10.0.0.10"),
        ("fd00::0010", "fd00::10"),
        ("[fd00::1]", "fd00::1"),
        ("pg-0.node.dc1.consul", "pg-0.node.dc1.consul"),
        ("Host.Example.", "host.example"),
    ],
)
def test_addresses_valid(address: str, normal: str) -> None:
    assert validate_address(address) == normal


@pytest.mark.parametrize(
    "address", [*INJECTIONS, "10.0.0.256", "-host", "host-", "a..b", "1.2.3", "x" * 300]
)
def test_addresses_invalid(address: str) -> None:
    with pytest.raises(InvalidSpec):
        validate_address(address)


def test_backup_ids() -> None:
    assert validate_backup_id(f"{GUID}-1740130000000")
    for bad in [*INJECTIONS, f"{GUID}-1740130000", f"{GUID.upper()}-1740130000000",
                f"{GUID}-1740130000000; rm -rf /", f"../{GUID}-1740130000000"]:
        with pytest.raises(InvalidSpec):
            validate_backup_id(bad)


def test_deployments_and_run_ids() -> None:
    assert validate_deployment("a9s-pg") == "a9s-pg"
    assert validate_run_id("abc-1") == "abc-1"
    assert run_id_for(f"{GUID}-1740130000000", "5F0C_2a9e!") == f"{GUID}-1740130000000-5f0c2a9e"
    for bad in INJECTIONS:
        with pytest.raises(InvalidSpec):
            validate_deployment(bad)
        with pytest.raises(InvalidSpec):
            validate_run_id(bad)


def test_nodes_model() -> None:
    node = Node("pg/0", "10.0.0.10")
    assert node.endpoint.host == "10.0.0.10"
    assert node.endpoint.port == 22
    with pytest.raises(InvalidSpec):
        Node("pg/0", "10.0.0.10", port=0)
    with pytest.raises(InvalidSpec):
        validate_nodes([node, Node("pg/0", "10.0.0.11")])
    with pytest.raises(InvalidSpec):
        validate_nodes([node, Node("pg/1", "10.0.0.10")])
    with pytest.raises(InvalidSpec):
        validate_nodes([])


def test_layout_paths() -> None:
    layout = A9sLayout(postgres_major=13)
    assert layout.data_dir == "/var/vcap/store/postgresql13"
    assert layout.dump_path(f"{GUID}-1740130000000") == (
        f"/var/vcap/store/postgresql-restore/{GUID}-1740130000000.dump")
    with pytest.raises(InvalidSpec):
        layout.dump_path("../../etc/passwd")
    with pytest.raises(InvalidSpec):
        A9sLayout(jobs_dir="/var/vcap/jobs/x; rm -rf /")


def test_sql_quoting() -> None:
    assert quote_ident("repmgr") == '"repmgr"'
    assert quote_ident('we"ird') == '"we""ird"'
    assert quote_literal("it's") == "E'it''s'"
    assert quote_literal("a\\'; DROP TABLE x; --") == "E'a\\\\''; DROP TABLE x; --'"
    for bad in ["", "a\nb", "a\0b"]:
        with pytest.raises(ValueError):
            quote_ident(bad)
    with pytest.raises(ValueError):
        quote_literal("a\n\\! rm -rf /")


def test_psql_argv_validates_database_and_uses_stdin() -> None:
    layout = A9sLayout()
    argv = psql_argv(layout, "repmgr_cluster", "-q")
    assert argv[:2] == ["bash", "-c"]
    assert argv[3:5] == ["pgrecovery", layout.vars_sh]
    assert argv[-2:] == ["-d", "repmgr_cluster"]
    assert "-c" not in argv[5:]  # SQL never on the command line
    for bad in ["host=evil", "x; rm", "-f/etc/passwd", "a b", "1abc"]:
        with pytest.raises(ValueError):
            validate_dbname(bad)
