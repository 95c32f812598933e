"""The pg_dumpall indexer: sections and entries at the right byte offsets, the same index for
any chunking of the stream, text that only looks like structure ignored, and every case it
does not understand reported as a serial fallback with a reason."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pgrecovery.cluster import dump_index
from pgrecovery.cluster.dump_index import DumpIndex, DumpIndexer, index_file
from tests.unit import dumptext


def _index(data: bytes, chunk: int | None = None) -> DumpIndex:
    indexer = DumpIndexer()
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        indexer.feed(data[i: i + step])
    return indexer.finish()


def _text(data: bytes, r: tuple[int, int]) -> bytes:
    return data[r[0]: r[1]]


def test_sections_and_entries_at_their_offsets() -> None:
    data = dumptext.dump()
    ix = _index(data)
    assert ix.fallback is None
    assert ix.size == len(data)
    assert _text(data, ix.globals).startswith(b"--\n-- PostgreSQL database cluster dump")
    assert _text(data, ix.globals).endswith(b"--\n-- Databases\n--\n\n")
    assert [d.name for d in ix.databases] == ["template1", "shop"]
    template1, shop = ix.databases
    assert template1.fallback is None
    assert shop.fallback is None
    assert _text(data, shop.connect) == b"\\connect shop\n"
    assert _text(data, (shop.start, shop.connect[0])).startswith(b'--\n-- Database "shop" dump')
    assert b"CREATE DATABASE shop" in _text(data, (shop.start, shop.connect[0]))
    preamble = _text(data, shop.preamble)
    assert preamble.startswith(b"\\restrict BBBB\n")
    assert b"SET statement_timeout = 0;" in preamble
    assert b"CREATE" not in preamble
    pre = _text(data, shop.pre)
    assert b"CREATE SCHEMA sales" in pre
    assert b"COMMENT ON TABLE public.orders" in pre
    assert b"COPY" not in pre

    assert [(e.type, e.name, e.table) for e in shop.data] == [
        ("TABLE DATA", "customers", "public.customers"),
        ("TABLE DATA", "orders", "public.orders"),
        ("TABLE DATA", "empty", "public.empty"),
        ("SEQUENCE SET", "orders_id_seq", None),
    ]
    customers, orders, empty, seq = shop.data
    assert customers.copy is not None
    assert orders.copy is not None
    assert empty.copy is not None
    assert _text(data, customers.copy) == dumptext.TRICKY_ROWS.encode()
    assert _text(data, orders.copy) == dumptext.ORDERS_ROWS.encode()
    assert _text(data, empty.copy) == b""
    assert _text(data, (customers.start, customers.copy[0])).endswith(
        b"COPY public.customers (id, note) FROM stdin;\n")
    assert _text(data, (customers.copy[1], customers.end)).startswith(b"\\.\n")
    assert seq.copy is None
    assert b"setval" in _text(data, (seq.start, seq.end))
    # Session settings in effect before the data: the ones pg_dump wrote before the tables.
    assert [_text(data, r) for r in customers.state] == [
        b"SET default_tablespace = '';\n", b"SET default_table_access_method = heap;\n"]

    assert [(e.type, e.name, e.table) for e in shop.post_parallel] == [
        ("CONSTRAINT", "customers customers_pkey", "public.customers"),
        ("INDEX", "orders_customer", "public.orders"),
        ("INDEX", "orders_id", "public.orders"),
    ]
    fast = shop.post_parallel[1]
    assert b"SET default_tablespace = fast;\n" in [_text(data, r) for r in fast.state]
    assert b"SET default_tablespace = fast;\n" not in [
        _text(data, r) for r in shop.post_parallel[2].state]
    serial = b"".join(_text(data, r) for r in shop.post_serial)
    assert b"COMMENT ON INDEX public.orders_id" in serial
    assert b"FOREIGN KEY" in serial
    assert b"GRANT SELECT" in serial
    # An index after the FK stays in dump order (serial): it might depend on what came before.
    assert b"CREATE INDEX orders_late" in serial
    assert b"CREATE INDEX orders_customer" not in serial
    assert shop.post_kinds == {"CONSTRAINT": 1, "INDEX": 3, "COMMENT": 1, "FK CONSTRAINT": 1,
                               "ACL": 1}
    assert template1.data == []
    assert b"COMMENT ON DATABASE" in _text(data, template1.pre)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 13, 64, 333, 4096])
def test_same_index_for_any_chunk_size(chunk: int) -> None:
    data = dumptext.dump()
    assert _index(data, chunk) == _index(data)


def test_same_index_for_random_chunk_boundaries() -> None:
    data = dumptext.dump()
    whole = _index(data)
    rng = random.Random(7)
    for _ in range(20):
        indexer = DumpIndexer()
        i = 0
        while i < len(data):
            n = rng.choice([1, 2, 3, rng.randint(1, 200)])
            indexer.feed(data[i: i + n])
            i += n
        assert indexer.finish() == whole


def test_row_boundaries_for_slicing_big_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump_index, "SPLIT_EVERY", 1000)
    data = dumptext.dump()
    orders = _index(data).databases[1].data[1]
    assert orders.copy is not None
    assert len(orders.splits) >= 5
    for s in orders.splits:
        assert orders.copy[0] < s < orders.copy[1]
        assert data[s - 1: s] == b"\n"
    assert all(b - a >= 1000 for a, b in zip(orders.splits, orders.splits[1:], strict=False))
    for chunk in (1, 3, 999, 1000, 1001):
        assert _index(data, chunk).databases[1].data[1].splits == orders.splits


def _copy_lines(data: bytes, entry: dump_index.Entry) -> int:
    assert entry.copy is not None
    return len(_text(data, entry.copy).splitlines())


def test_rows_counted_per_copy_block() -> None:
    data = dumptext.dump()
    ix = _index(data)
    copies = [e for db in ix.databases for e in db.data if e.copy is not None]
    assert copies
    for e in copies:
        assert e.rows == _copy_lines(data, e), e.table
    # The sample's orders block carries rows that look like terminators and headers.
    orders = ix.databases[1].data[1]
    assert orders.rows is not None
    assert orders.rows > 1


def test_empty_copy_block_has_zero_rows() -> None:
    data = dumptext.dump(shop_data=dumptext.entry(
        "empty", "TABLE DATA", "COPY public.empty (id) FROM stdin;\n\\.\n", data=True))
    ix = _index(data)
    empty = next(e for db in ix.databases for e in db.data if e.table == "public.empty")
    assert empty.rows == 0
    for chunk in (1, 2, 3, 5):
        again = next(e for db in _index(data, chunk).databases for e in db.data
                     if e.table == "public.empty")
        assert again.rows == 0


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 13, 64, 333, 4096])
def test_row_counts_for_any_chunk_size(chunk: int) -> None:
    data = dumptext.dump()
    rows = [e.rows for db in _index(data).databases for e in db.data]
    assert rows == [e.rows for db in _index(data, chunk).databases for e in db.data]
    assert any(r for r in rows)


def test_json_round_trip_and_version() -> None:
    ix = _index(dumptext.dump())
    assert ix.version == dump_index.INDEX_VERSION == 2
    assert DumpIndex.from_json(ix.to_json()) == ix
    with pytest.raises(ValueError, match="version"):
        DumpIndex.from_json(ix.to_json().replace('"version":2', '"version":99'))
    with pytest.raises(ValueError, match="not an object"):
        DumpIndex.from_json("[]")


def test_index_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "x.dump"
    path.write_bytes(dumptext.dump())
    assert index_file(path, chunk_size=17) == _index(dumptext.dump())


def test_name_needing_quotes_connects_with_encoding_line() -> None:
    extra = dumptext.database(
        "odd", dumptext.entry("t", "TABLE", "CREATE TABLE public.t (id int);"),
        connect="\\encoding SQL_ASCII\n\\connect -reuse-previous=on \"dbname='Odd Db'\"")
    data = dumptext.dump(extra=extra)
    odd = _index(data).databases[2]
    assert odd.name == "Odd Db"
    assert odd.fallback is None
    assert _text(data, odd.connect) == (
        b"\\encoding SQL_ASCII\n\\connect -reuse-previous=on \"dbname='Odd Db'\"\n")


# ------------------------------------------------------------------------ fallbacks


def _shop(data: bytes) -> dump_index.DatabaseIndex:
    ix = _index(data)
    assert ix.fallback is None
    return ix.databases[1]


def test_large_objects_fall_back() -> None:
    blob = dumptext.entry("16397", "BLOB", "SELECT pg_catalog.lo_create('16397');", "-")
    assert "large objects" in (_shop(dumptext.dump(shop_pre=dumptext.PRE_DATA + blob)).fallback
                               or "")


def test_unknown_meta_command_in_a_database_falls_back() -> None:
    data = dumptext.dump(shop_post=dumptext.POST_DATA + "\\i /etc/passwd\n")
    assert "meta-command" in (_shop(data).fallback or "")
    assert _index(data).databases[0].fallback is None  # only that database


def test_unknown_meta_command_in_the_globals_falls_back_entirely() -> None:
    data = dumptext.dump(globals_=dumptext.GLOBALS.replace("SET default_transaction",
                                                           "\\set x 1\nSET default_transaction"))
    assert "meta-command" in (_index(data).fallback or "")


def test_connect_to_another_database_falls_back() -> None:
    data = dumptext.dump(shop_post=dumptext.POST_DATA + "\\connect other\n")
    assert "another database" in (_shop(data).fallback or "")


def test_non_data_entry_between_data_entries_falls_back() -> None:
    odd = dumptext.entry("x", "VIEW", "CREATE VIEW public.x AS SELECT 1;")
    data = dumptext.dump(shop_data=dumptext.DATA.replace("--\n-- Data for Name: orders",
                                                         odd + "--\n-- Data for Name: orders"))
    assert "VIEW entry between data entries" in (_shop(data).fallback or "")


def test_statement_outside_entries_after_the_data_falls_back() -> None:
    # After a session setting no entry is open: the statement belongs to none.
    data = dumptext.dump(shop_post="SET default_tablespace = '';\n\nDELETE FROM public.orders;\n\n"
                         + dumptext.POST_DATA)
    assert "outside any pg_dump entry" in (_shop(data).fallback or "")


def test_truncated_copy_falls_back_entirely() -> None:
    data = dumptext.dump()
    cut = data[: data.index(b"order 200")]
    ix = _index(cut)
    assert "no \\. terminator" in (ix.fallback or "")
    assert ix.size == len(cut)


def test_open_quote_at_the_end_falls_back_entirely() -> None:
    data = dumptext.dump(shop_post=dumptext.POST_DATA + "COMMENT ON TABLE x IS 'open\n")
    assert "inside a quoted string" in (_index(data).fallback or "")


def test_a_plain_pg_dump_is_not_a_pg_dumpall_script() -> None:
    data = (dumptext.PREAMBLE + dumptext.PRE_DATA + dumptext.DATA).encode()
    ix = _index(data)
    assert ix.fallback == "COPY outside a database section"  # the first oddity found
    assert ix.databases == []
    no_copy = _index((dumptext.PREAMBLE + dumptext.PRE_DATA).encode())
    assert no_copy.fallback == "no pg_dumpall database sections found"


def test_empty_input() -> None:
    ix = _index(b"")
    assert ix.size == 0
    assert ix.fallback == "no pg_dumpall database sections found"


def test_text_after_the_cluster_dump_falls_back_entirely() -> None:
    data = dumptext.dump() + b"DROP DATABASE shop;\n"
    assert _index(data).fallback == "text after the end of the cluster dump"
    assert _index(dumptext.dump() + b"\n-- a comment\n").fallback is None


def test_index_phase_only_takes_entries_whose_sql_matches_their_type() -> None:
    # A header is a comment made of names: a schema named "x; Type: INDEX; …" could dress an
    # FK up as an index. The statements decide.
    spoofed = dumptext.entry(
        "orders fk2", "INDEX",
        "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT fk2 FOREIGN KEY (customer) "
        "REFERENCES public.customers(id);")
    clustered = dumptext.entry(
        "orders_c", "INDEX", "CREATE INDEX orders_c ON public.orders USING btree (customer);"
        "\n\nALTER TABLE public.orders CLUSTER ON orders_c;")
    smuggled = dumptext.entry(
        "orders_d", "INDEX", "CREATE INDEX orders_d ON public.orders USING btree (id);\n"
        "DELETE FROM public.orders;")
    shop = _shop(dumptext.dump(shop_post=clustered + smuggled + spoofed + dumptext.POST_DATA))
    assert [e.name for e in shop.post_parallel] == ["orders_c"]
    data = dumptext.dump(shop_post=clustered + smuggled + spoofed + dumptext.POST_DATA)
    serial = b"".join(_text(data, r) for r in shop.post_serial)
    assert b"DELETE FROM public.orders" in serial
    assert b"FOREIGN KEY (customer)" in serial


def test_index_of_version_1_is_read_without_row_counts() -> None:
    """A recovery saved its index before the upgrade: it still restores; the rows are unknown
    (the restore proof reports them as not counted) instead of being taken as 0."""
    ix = _index(dumptext.dump())
    text = ix.to_json().replace('"version":2', '"version":1')
    text = text.replace('"rows":', '"rows_gone":')
    old = DumpIndex.from_json(text)
    assert old.version == 1
    assert all(e.rows is None for db in old.databases for e in db.data)
    assert [e.copy for db in old.databases for e in db.data] == \
        [e.copy for db in ix.databases for e in db.data]


def test_roles_the_globals_drop_and_create_again() -> None:
    # A role dropped and created (pg_dumpall --clean), one only created, and text that looks
    # like a DROP ROLE inside a quoted string of another statement: not a statement of its own.
    text = dumptext.dump(globals_=dumptext.GLOBALS.replace(
        "DROP ROLE IF EXISTS postgres;\n",
        'DROP ROLE IF EXISTS postgres;\nDROP ROLE "Odd Role";\n'
        "COMMENT ON ROLE app IS 'x\nDROP ROLE ghost;\nCREATE ROLE ghost;\n';\n").replace(
        "CREATE ROLE postgres;\n", 'CREATE ROLE postgres;\nCREATE ROLE "Odd Role";\n'
        "CREATE ROLE only_created;\n"))
    index = DumpIndex.from_json(_index(text).to_json())
    assert index.recreated_roles == ["Odd Role", "app", "postgres"]
    # An index written before the field existed reads as none.
    raw = json.loads(index.to_json())
    del raw["recreated_roles"]
    assert DumpIndex.from_json(json.dumps(raw)).recreated_roles == []
