"""Parsers of what the VMs print: monit summary, repmgr cluster show, pg_hba.conf.

The monit outputs were captured from monit 5.33.0 on Debian bookworm (the same binary the
simulated VMs run), including a long service name and long states cut with `...`, and the
coloured box table monit draws on a terminal; the 5.2 style is the one documented for old
BOSH stemcells. The repmgr table follows repmgr 5.3's `cluster show` layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pgrecovery.cluster import hba
from pgrecovery.cluster.monit import ServiceState, find_service, normalise_state, parse_summary
from pgrecovery.cluster.nodes import Node
from pgrecovery.cluster.repmgr import (
    match_row,
    parse_cluster_show,
    parse_cluster_show_csv,
)

pytestmark = pytest.mark.unit

MONIT_533_STARTING = """\
Monit 5.33.0 uptime: 0m
 Service Name                     Status                      Type          
 vm                               Initializing - start pe...  System        
 postgresql-ha                    Initializing - start pe...  Process       
 repmgr-with-a-very-long-name...  Initializing - start pe...  Process       
"""  # noqa: W291 - monit pads with spaces

MONIT_533_STOP = """\
Monit 5.33.0 uptime: 0m
 Service Name                     Status                      Type          
 vm                               OK                          System        
 postgresql-ha                    OK - stop pending           Process       
 repmgr                           Not monitored               Process       
"""  # noqa: W291

MONIT_533_MIXED = """\
Monit 5.33.0 uptime: 0m
 Service Name                     Status                      Type          
 vm                               OK                          System        
 postgresql-ha                    Not monitored - start p...  Process       
 repmgr                           Data access error | Doe...  Process       
"""  # noqa: W291

MONIT_533_TTY = (
    "Monit 5.33.0 uptime: 0m\r\n"
    "\x1b[0;90m┌─────────────┬──────────────┬─────────┐\x1b[0m\r\n"
    "\x1b[0;90m│\x1b[0m \x1b[1;36mService Name   \x1b[0m \x1b[0;90m│\x1b[0m "
    "\x1b[1;36mStatus          \x1b[0m \x1b[0;90m│\x1b[0m \x1b[1;36mType   \x1b[0m "
    "\x1b[0;90m│\x1b[0m\r\n"
    "\x1b[0;90m├─────────────┼──────────────┼─────────┤\x1b[0m\r\n"
    "\x1b[0;90m│\x1b[0m postgresql-ha   \x1b[0;90m│\x1b[0m \x1b[0;91mData access error   "
    "\x1b[0m\x1b[0;90m│\x1b[0m Process       \x1b[0;90m│\x1b[0m\r\n"
    "\x1b[0;90m│\x1b[0m repmgr          \x1b[0;90m│\x1b[0m \x1b[0;93mNot monitored       "
    "\x1b[0m\x1b[0;90m│\x1b[0m Process       \x1b[0;90m│\x1b[0m\r\n"
    "\x1b[0;90m└─────────────┴──────────────┴─────────┘\x1b[0m\r\n"
)

MONIT_52 = """\
The Monit daemon 5.2.5 uptime: 10d 3h 2m 

Process 'postgresql-ha'             running
Process 'repmgr'                    not monitored
Process 'pg_janitor'                Does not exist
System 'system_localhost'           running
"""  # noqa: W291


def _states(text: str) -> dict[str, ServiceState]:
    return {name: s.state for name, s in parse_summary(text).items()}


def test_monit_533_start_pending_cut_states() -> None:
    states = _states(MONIT_533_STARTING)
    assert states["postgresql-ha"] is ServiceState.START_PENDING
    assert states["vm"] is ServiceState.START_PENDING
    services = parse_summary(MONIT_533_STARTING)
    long_name = find_service(services, "repmgr-with-a-very-long-name-for-cutting")
    assert long_name is not None
    assert long_name.state is ServiceState.START_PENDING


def test_monit_533_stop_pending_and_not_monitored() -> None:
    assert _states(MONIT_533_STOP) == {
        "vm": ServiceState.RUNNING,
        "postgresql-ha": ServiceState.STOP_PENDING,
        "repmgr": ServiceState.NOT_MONITORED,
    }


def test_monit_533_cut_start_pending_and_failure() -> None:
    states = _states(MONIT_533_MIXED)
    assert states["postgresql-ha"] is ServiceState.START_PENDING
    assert states["repmgr"] is ServiceState.FAILED


def test_monit_533_terminal_table_with_colours() -> None:
    assert _states(MONIT_533_TTY) == {
        "postgresql-ha": ServiceState.FAILED,
        "repmgr": ServiceState.NOT_MONITORED,
    }


def test_monit_52_style() -> None:
    assert _states(MONIT_52) == {
        "postgresql-ha": ServiceState.RUNNING,
        "repmgr": ServiceState.NOT_MONITORED,
        "pg_janitor": ServiceState.FAILED,
        "system_localhost": ServiceState.RUNNING,
    }


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("OK", ServiceState.RUNNING),
        ("Not monitored", ServiceState.NOT_MONITORED),
        ("Not monitored - start pending", ServiceState.START_PENDING),
        ("Not monitored - start p...", ServiceState.START_PENDING),
        ("OK - stop pending", ServiceState.STOP_PENDING),
        ("Initializing", ServiceState.INITIALIZING),
        ("Execution failed | Does not exist", ServiceState.FAILED),
        ("Not monitored...", ServiceState.UNKNOWN),  # ambiguous: never guessed
        ("something new", ServiceState.UNKNOWN),
    ],
)
def test_normalise_state(raw: str, state: ServiceState) -> None:
    assert normalise_state(raw) is state


def test_monit_garbage_yields_nothing() -> None:
    assert parse_summary("Cannot create socket to [127.0.0.1]:2822 -- Connection refused\n") == {}


REPMGR_SHOW = (Path(__file__).parent / "data" / "repmgr_cluster_show.txt").read_text()


def test_repmgr_cluster_show_table() -> None:
    rows = parse_cluster_show(REPMGR_SHOW)
    assert [(r.node_id, r.name, r.role, r.marker, r.status) for r in rows] == [
        (1, "pg-0", "primary", "*", "running"),
        (2, "pg-1", "standby", "", "running"),
        (3, "pg-2", "standby", "?", "unreachable"),
    ]
    assert rows[0].host == "10.77.0.10"
    assert rows[0].healthy
    assert not rows[2].healthy
    assert match_row(rows, Node("pg/1", "10.77.0.11")) is rows[1]
    assert match_row(rows, Node("pg/7", "10.77.0.99")) is None


def test_repmgr_cluster_show_promoted_by_hand() -> None:
    text = REPMGR_SHOW.replace(
        "| standby |   running | pg-0 ", "| standby | ! running as primary | pg-0 "
    )
    row = parse_cluster_show(text)[1]
    assert row.marker == "!"
    assert row.status == "running as primary"
    assert not row.healthy


def test_repmgr_cluster_show_empty_and_csv() -> None:
    assert parse_cluster_show("") == []
    rows = parse_cluster_show_csv("1,0,0\n2,0,1\n3,-1,-1\n")
    assert [(r.node_id, r.reachable, r.recovery) for r in rows] == [
        (1, True, "primary"), (2, True, "standby"), (3, False, "unknown")]
    old = parse_cluster_show_csv("1,0\n2,-1\n")
    assert [(r.reachable, r.recovery) for r in old] == [(True, "unknown"), (False, "unknown")]


SIM_HBA = """\
# TYPE  DATABASE        USER            ADDRESS             METHOD
local   all             all                                 peer
local   replication     all                                 peer
host    replication     repmgr          10.77.0.0/24        scram-sha-256
host    replication     repmgr          127.0.0.1/32        scram-sha-256
host    all             all             10.77.0.0/24        scram-sha-256
host    all             all             127.0.0.1/32        scram-sha-256
hostssl all             app             0.0.0.0/0           md5 clientcert=verify-ca
host    all             all             10.1.0.0 255.255.0.0 md5
host    all             all             app.example.com     md5
host    all             all             samenet             md5
"""


def test_hba_block_keeps_local_loopback_and_nodes_only() -> None:
    text = hba.blocked_hba(SIM_HBA, ["10.77.0.10", "10.77.0.11", "10.77.0.12"],
                           orig_path="/x/pg_hba.conf.pgrecovery-orig")
    lines = text.splitlines()
    assert hba.is_blocked(text)
    assert lines[-1] == "host all all all reject"
    rules = [ln for ln in lines if not ln.startswith("#")]
    assert "local all all peer" in rules
    assert "host replication repmgr 10.77.0.11/32 scram-sha-256" in rules
    assert "host all all 127.0.0.1/32 scram-sha-256" in rules
    assert "hostssl all app 10.77.0.12/32 md5 clientcert=verify-ca" in rules
    # nothing admits a whole network or a host name any more
    for rule in rules[:-1]:
        fields = rule.split()
        if fields[0] != "local":
            assert fields[3].endswith(("/32", "/128")), rule
    assert not any("example.com" in r or "10.1.0.0" in r for r in rules)
    # the 10.1/16 mask line matches no node: dropped
    assert not any("10.1." in r for r in rules)


def test_hba_mask_form_matches() -> None:
    rec = hba.parse_line("host all all 10.1.0.0 255.255.0.0 md5")
    assert rec is not None
    assert rec.mask == "255.255.0.0"
    assert hba.matches(rec, "10.1.2.3")
    assert not hba.matches(rec, "10.2.0.1")
    assert hba.parse_line("# comment") is None
    assert hba.parse_line("include_dir conf.d") is None


def test_hba_rejects_host_names_as_allowed() -> None:
    with pytest.raises(ValueError):
        hba.blocked_hba(SIM_HBA, ["pg0.example.com"], orig_path="/x")
    assert hba.ip_addresses(["10.0.0.1", "pg0", "::1", "fe80::1"]) == ["10.0.0.1", "::1",
                                                                        "fe80::1"]
