"""The restore proof's pure parts: what is counted from the index (and what is reported as not
verified, with the reason), the comparison with what a node holds, the grouping of tables into
sessions, and the replay wait against a fake node."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from pgrecovery.adapters.ssh import CommandResult
from pgrecovery.cluster import restore_proof
from pgrecovery.cluster.dump_index import DumpIndex, DumpIndexer
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.restore_proof import Expected, Found, ProofPlan
from tests.unit import dumptext

REPMGR = dumptext.database(
    "repmgr_cluster",
    dumptext.entry("nodes", "TABLE", "CREATE TABLE repmgr.nodes (node_id integer);", "repmgr")
    + dumptext.entry("nodes", "TABLE DATA",
                     "COPY repmgr.nodes (node_id) FROM stdin;\n1\n2\n3\n\\.\n", "repmgr",
                     data=True)
    + dumptext.entry("notes", "TABLE DATA",
                     "COPY public.notes (t) FROM stdin;\nkept\n\\.\n", data=True),
)


def _index(data: bytes) -> DumpIndex:
    indexer = DumpIndexer()
    indexer.feed(data)
    return indexer.finish()


def test_plan_counts_each_copied_table_of_each_database() -> None:
    plan = restore_proof.plan_proof(_index(dumptext.dump()))
    by_name = {t.name: t for t in plan.tables}
    assert set(by_name) == {"shop.public.customers", "shop.public.orders", "shop.public.empty"}
    assert by_name["shop.public.orders"].rows == 399
    assert by_name["shop.public.customers"].rows == 6  # rows that look like `\.` and headers
    assert by_name["shop.public.empty"].rows == 0
    assert plan.databases == ["shop"]
    assert plan.rows == 405
    assert plan.not_verified == []


def test_repmgr_tables_are_reported_not_verified_and_others_in_its_database_counted() -> None:
    plan = restore_proof.plan_proof(_index(dumptext.dump(extra=REPMGR)))
    names = {t.name for t in plan.tables}
    assert "repmgr_cluster.public.notes" in names
    assert not any("repmgr.nodes" in n for n in names)
    assert any(n.startswith("repmgr_cluster.repmgr.*: repmgr's own tables")
               for n in plan.not_verified)


def test_fallback_database_is_not_verified_with_its_reason() -> None:
    lob = dumptext.entry("16400", "BLOB", "SELECT pg_catalog.lo_create('16400');")
    plan = restore_proof.plan_proof(_index(dumptext.dump(shop_post=dumptext.POST_DATA + lob)))
    assert not any(t.database == "shop" for t in plan.tables)
    assert any(n.startswith("shop: restored serially") and "large objects" in n
               for n in plan.not_verified)


def test_whole_dump_fallback_and_missing_index_verify_nothing() -> None:
    broken = _index(dumptext.dump() + b"SELECT 'open\n")
    assert broken.fallback
    plan = restore_proof.plan_proof(broken)
    assert plan.tables == []
    assert plan.not_verified[0].startswith("*: the dump could not be indexed")
    missing = restore_proof.plan_proof(None, "the dump index is missing (work volume reset)")
    assert missing.tables == []
    assert missing.not_verified == ["*: the dump index is missing (work volume reset)"]


def test_insert_style_data_and_old_index_are_not_verified() -> None:
    inserts = dumptext.entry("kv", "TABLE DATA", "INSERT INTO public.kv VALUES (1);", data=True)
    ix = _index(dumptext.dump(shop_data=dumptext.DATA + inserts))
    plan = restore_proof.plan_proof(ix)
    assert any("1 table(s) dumped as INSERT statements" in n for n in plan.not_verified)
    old = DumpIndex.from_json(ix.to_json().replace('"version":2', '"version":1')
                              .replace('"rows":', '"_rows":'))
    plan = restore_proof.plan_proof(old)
    assert plan.tables == []
    assert any("written by an older pgrecovery" in n for n in plan.not_verified)


def _t(name: str, rows: int, size: int = 100, db: str = "shop") -> Expected:
    return Expected(db, name, rows, size)


def test_compare_names_table_expected_and_found() -> None:
    a, b, c, d = _t("public.a", 10), _t("public.b", 5), _t("public.c", 0), _t("public.d", 3)
    plan = ProofPlan(tables=[a, b, c, d])
    found = {a: Found(10), b: Found(4), c: Found(None), d: Found(7, extension=True)}
    proof = restore_proof.compare("pg/0", plan, found)
    assert not proof.ok
    assert [m.describe() for m in proof.mismatches] == [
        "shop.public.b: expected 5 rows, found 4",
        "shop.public.c: expected 0 rows, the table is missing",
    ]
    assert proof.tables == 1
    assert proof.rows == 10
    assert proof.not_verified == [
        "shop.public.d: extension configuration table, expected 3 rows, found 7 (the "
        "extension may add rows of its own)"]
    assert "2 table(s) on pg/0 do not hold the rows the dump carries: shop.public.b: " \
           "expected 5 rows, found 4" in proof.failure()


def test_compare_all_equal_is_ok() -> None:
    a, e = _t("public.a", 10), _t("public.ext_config", 2)
    found = {a: Found(10), e: Found(2, extension=True)}
    proof = restore_proof.compare("pg/1", ProofPlan(tables=[a, e]), found)
    assert proof.ok
    # An extension's table with exactly the dump's rows is verified like any other.
    assert (proof.tables, proof.rows) == (2, 12)
    assert proof.not_verified == []


def test_groups_stay_in_one_database_and_balance_bytes() -> None:
    tables = [_t(f"public.t{i}", 1, size) for i, size in enumerate([900, 500, 400, 100, 50])]
    tables += [_t("public.x", 1, 10, db="other")]
    groups = restore_proof._groups(tables, 2)
    assert all(len({t.database for t in g}) == 1 for g in groups)
    shop = [sum(t.bytes for t in g) for g in groups if g[0].database == "shop"]
    assert sorted(shop) == [950, 1000]
    assert sum(len(g) for g in groups) == len(tables)
    assert restore_proof._groups(tables, 1)[0][0].bytes == 900


def test_count_sql_quotes_names_as_literals() -> None:
    t = _t('public."x\'; DROP TABLE y; --"', 1)
    sql = restore_proof.count_sql([t])
    assert "E'public.\"x''; DROP TABLE y; --\"'" in sql
    assert "to_regclass(t.name)" in sql
    with pytest.raises(ValueError, match="control"):
        restore_proof.count_sql([_t("public.a\nb", 1)])


def test_parse_counts() -> None:
    a, b = _t("public.a", 1), _t("public.b", 2)
    found = restore_proof.parse_counts([a, b], [["1", "missing", ""], ["0", "table", "1"]])
    assert found == {a: Found(1), b: Found(None)}


@dataclass
class FakeStandby:
    """Answers the replay query: a scripted sequence of (replayed, reached, paused)."""

    answers: list[tuple[str, bool, bool]]
    asked: list[str] = field(default_factory=list)

    async def run_root(self, node: object, argv: Sequence[str], *, input: object = None,
                       timeout: float | None = None, check: bool = True) -> CommandResult:
        self.asked.append(str(input))
        replayed, reached, paused = self.answers[0] if len(self.answers) == 1 \
            else self.answers.pop(0)
        out = f"{replayed},{'t' if reached else 'f'},t,{'t' if paused else 'f'}\n"
        return CommandResult(0, out, "")


NODE = Node(name="pg/1", address="10.0.0.11")


def test_wait_replayed_returns_once_past_the_restore() -> None:
    shell = FakeStandby([("0/100", False, False), ("0/300", True, False)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restore_proof, "REPLAY_POLL", 0.0)
        why = asyncio.run(restore_proof.wait_replayed(shell, NODE, A9sLayout(), "0/200"))  # type: ignore[arg-type]
    assert why is None
    assert "'0/200'::pg_catalog.pg_lsn" in shell.asked[0]


def test_paused_replay_fails_with_a_clear_reason_after_its_grace() -> None:
    shell = FakeStandby([("0/100", False, True)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restore_proof, "REPLAY_POLL", 0.0)
        why = asyncio.run(restore_proof.wait_replayed(
            shell, NODE, A9sLayout(), "0/200", timeout=60, paused_grace=0.05))  # type: ignore[arg-type]
    assert why is not None
    assert "pg/1 has replayed WAL up to 0/100 only, the restore ended at 0/200" in why
    assert "replay is paused" in why
    assert "pg_wal_replay_resume()" in why


def test_lagging_standby_times_out_with_its_position() -> None:
    shell = FakeStandby([("0/100", False, False)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restore_proof, "REPLAY_POLL", 0.0)
        why = asyncio.run(restore_proof.wait_replayed(
            shell, NODE, A9sLayout(), "0/200", timeout=0.05))  # type: ignore[arg-type]
    assert why is not None
    assert "after 0 s, the restore ended at 0/200" in why


def test_wal_position_is_validated() -> None:
    with pytest.raises(ValueError, match="WAL position"):
        asyncio.run(restore_proof.replay_state(
            FakeStandby([("", False, False)]), NODE, A9sLayout(), "0/1'; DROP"))  # type: ignore[arg-type]
