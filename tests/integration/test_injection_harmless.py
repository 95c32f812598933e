"""Harmless even if they got through: hostile strings handed to the real command builders and
executed for real — over SSH (login user + `sudo -n`) on a simulated BOSH VM, through psql on
its real PostgreSQL 15, and as a detached job — arrive literally and run nothing else.

tests/unit/test_injection_rejected.py shows that the CRD and the typed model reject these
values in every spec field; this is the third wall. For each payload the proof is positive
(the value comes back byte for byte: as printf output, as a file's content and name, as a SQL
literal's value, as a column name, in a job's log) and negative (canaries: `/tmp/pwned` does
not exist on the VM nor on the host, and a directory that a `; rm -rf …` payload names is
still there).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pgrecovery.adapters.jobs import JobRunner, JobState, validate_job_id
from pgrecovery.adapters.ssh import SshAuth, SshPool, root_command, shell_join, shell_script_argv
from pgrecovery.cluster import psql
from pgrecovery.cluster.nodes import A9sLayout, Node, validate_address, validate_node_name
from pgrecovery.errors import InvalidSpec
from tests.simcluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]

CANARY_DIR = "/tmp/pgr-inj-canary"
PWNED = "/tmp/pwned"
# The brief's list plus canaried variants: if any payload ran, a canary shows it.
PAYLOADS = [
    "; rm -rf /",  # GNU rm refuses `/` anyway; the next one is the detectable twin
    f"; rm -rf {CANARY_DIR}",
    f"$(touch {PWNED})",
    f"`touch {PWNED}`",
    f"x' ; touch {PWNED}; echo '",
    f'x" ; touch {PWNED}; echo "',
    f"pg-0\ntouch {PWNED}",
    "--option",
    "-rf",
    f"a && touch {PWNED} || touch {PWNED}",
    f"a | tee {PWNED}",
    f"> {PWNED}",
    "$HOME ${PATH} * ~root \\ \t tab",
    "x'); DROP TABLE pg_class; --",
    'x"; DROP DATABASE postgres; --',
    "ünïcødé ✓",
    "L" * 5000,
]
SQL_IDENT_MAX = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer identifiers


@pytest.fixture
async def pool(healthy_sim_cluster: SimCluster) -> AsyncIterator[SshPool]:
    cluster = healthy_sim_cluster
    auth = SshAuth(cluster.ssh_user, cluster.client_key_path.read_bytes(), cluster.known_hosts)
    async with SshPool(auth, connect_timeout=10) as p:
        yield p


@pytest.fixture
def canaries(healthy_sim_cluster: SimCluster) -> Iterator[None]:
    """Plant the canary directory on every VM (and the host) and make sure no `pwned` file
    exists before the test; checked again afterwards by `_assert_nothing_ran`."""
    for vm in healthy_sim_cluster.vms:
        vm.run(f"rm -f {PWNED}; mkdir -p {CANARY_DIR} && touch {CANARY_DIR}/alive")
    Path(CANARY_DIR).mkdir(exist_ok=True)
    (Path(CANARY_DIR) / "alive").touch()
    assert not Path(PWNED).exists(), f"{PWNED} exists on the host before the test"
    yield
    shutil.rmtree(CANARY_DIR, ignore_errors=True)


def _assert_nothing_ran(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        assert not vm.host_path(PWNED).exists(), f"{PWNED} was created on {vm.name}"
        assert vm.host_path(f"{CANARY_DIR}/alive").exists(), f"canary removed on {vm.name}"
    assert not Path(PWNED).exists(), f"{PWNED} was created on the host"
    assert (Path(CANARY_DIR) / "alive").exists(), "canary removed on the host"


def _node(cluster: SimCluster) -> Node:
    vm = cluster.primary()
    return Node(vm.name, vm.address)


@pytest.mark.usefixtures("canaries")
async def test_argv_arrives_literally_over_ssh_and_sudo(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    node = _node(healthy_sim_cluster)
    tried = 0
    for payload in PAYLOADS:
        # root_command/shell_join: the argv as one shell text, parsed by the login shell.
        res = await pool.run_root(node.endpoint, ["printf", "%s", payload], timeout=30)
        assert res.stdout == payload, (payload, res.stdout)
        assert shell_join(["printf", "%s", payload]) in root_command(["printf", "%s", payload])
        # root_shell style: a constant script, the value only as "$1"/"$2".
        script = 'd=$(mktemp -d) && printf "%s" "$1" > "$d/content" && cd "$d" \
&& mkdir sub && touch -- "sub/$2" && cat content && printf "\\0" && ls -A sub && rm -rf "$d"'
        name = payload.replace("/", "_")[:200]  # a file name: no slash, NAME_MAX
        res = await pool.run_root(
            node.endpoint, shell_script_argv(script, payload, name), timeout=30
        )
        content, _, listing = res.stdout.partition("\0")
        assert content == payload
        assert listing == name + "\n", (name, listing)
        tried += 1
    _assert_nothing_ran(healthy_sim_cluster)
    print(f"\nssh/sudo argv: {tried} hostile values arrived literally, nothing else ran")


@pytest.mark.usefixtures("canaries")
async def test_sql_literals_and_identifiers_arrive_literally_in_postgresql(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    node = _node(healthy_sim_cluster)
    layout = A9sLayout()
    for payload in PAYLOADS:
        if "\n" in payload:
            # Control characters (tab aside) are refused outright by both quoting helpers.
            with pytest.raises(ValueError, match=r"control|unsafe"):
                psql.quote_literal(payload)
            with pytest.raises(ValueError, match="unsafe"):
                psql.quote_ident(payload)
            continue
        rows = await psql.query(
            pool, node, layout, f"SELECT {psql.quote_literal(payload)};", timeout=30
        )
        assert rows == [[payload]], (payload, rows)
        ident = psql.quote_ident(payload[:SQL_IDENT_MAX])
        rows = await psql.query(
            pool,
            node,
            layout,
            f"BEGIN; CREATE TEMP TABLE pgr_injection ({ident} int); "  # noqa: S608 - the test
            "SELECT attname FROM pg_attribute WHERE attrelid = 'pgr_injection'::regclass "
            "AND attnum > 0; ROLLBACK;",
            timeout=30,
        )
        assert rows == [[payload[:SQL_IDENT_MAX]]], (payload, rows)
        # A database name is one argv element, and only a plain identifier is accepted.
        with pytest.raises(ValueError, match="unsafe database name"):
            psql.psql_argv(layout, payload)
    # Nothing was dropped: pg_class and the postgres database are still there.
    rows = await psql.query(pool, node, layout, "SELECT count(*) > 0 FROM pg_class;")
    assert rows == [["t"]]
    _assert_nothing_ran(healthy_sim_cluster)


@pytest.mark.usefixtures("canaries")
async def test_job_argv_arrives_literally_and_job_ids_are_validated(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    node = _node(healthy_sim_cluster)
    jobs = JobRunner(pool, root="/var/vcap/store/pgrecovery/jobs-injection-test")
    for index, payload in enumerate(PAYLOADS):
        with pytest.raises(ValueError, match="invalid job id"):
            validate_job_id(payload)
        job_id = f"injection-{index}"
        await jobs.start_job(node.endpoint, job_id, ["printf", "%s", payload])
        for _ in range(100):
            status = await jobs.poll_job(node.endpoint, job_id, tail_bytes=8192)
            if status.state is JobState.FINISHED:
                break
        assert status.succeeded, status
        assert status.log_tail == payload
        await jobs.remove_job(node.endpoint, job_id)
    _assert_nothing_ran(healthy_sim_cluster)


def test_spec_level_validators_refuse_every_payload() -> None:
    """Node names and addresses are validated again below the model (cluster layer)."""
    for payload in PAYLOADS:
        with pytest.raises(InvalidSpec):
            validate_node_name(payload)
        with pytest.raises(InvalidSpec):
            validate_address(payload)


def test_nul_is_refused_by_every_builder() -> None:
    value = "a\x00b"
    for build in (
        lambda: shell_join(["printf", value]),
        lambda: root_command(["printf", value]),
        lambda: shell_script_argv("true", value),
        lambda: psql.quote_literal(value),
        lambda: psql.quote_ident(value),
    ):
        with pytest.raises(ValueError, match=r"NUL|control|unsafe"):
            build()
