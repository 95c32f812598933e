"""What the dump drops and creates (seen by the indexer), the verdict on existing databases,
and the staged dump's marker."""

from __future__ import annotations

import json

import pytest

from pgrecovery.cluster.dump_index import DumpIndex, DumpIndexer
from pgrecovery.cluster.existing_databases import Existing, conninfo, decide
from pgrecovery.cluster.staged_dump import DumpMarker

_PRE = """SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);

"""
_TABLE = """--
-- Name: t; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.t (
    id integer NOT NULL
);

--
-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.t (id) FROM stdin;
1
2
\\.

"""


def _section(name: str, connect: str, *, clean: bool, builtin: bool, table: bool) -> str:
    head = f'--\n-- Database "{name}" dump\n--\n\n'
    body = "--\n-- PostgreSQL database dump\n--\n\n" + _PRE
    quoted = f'"{name}"' if " " in name else name
    create = (f"--\n-- Name: {name}; Type: DATABASE; Schema: -; Owner: postgres\n--\n\n"
              f"CREATE DATABASE {quoted} WITH TEMPLATE = template0 ENCODING = 'UTF8';\n\n"
              f"ALTER DATABASE {quoted} OWNER TO postgres;\n\n")
    content = _PRE + (_TABLE if table else "") + "--\n-- PostgreSQL database dump complete\n--\n\n"
    if builtin and not clean:  # pg_dumpall connects first, pg_dump creates nothing
        return head + f"{connect}\n\n" + body + content
    drop = f"DROP DATABASE {quoted};\n" if builtin else ""
    return head + body + drop + create + f"{connect}\n\n" + content


def _dump(*, clean: bool) -> str:
    drops = ('--\n-- Drop databases (except postgres and template1)\n--\n\n'
             'DROP DATABASE IF EXISTS shop;\nDROP DATABASE IF EXISTS "we ird";\n'
             'DROP DATABASE IF EXISTS repmgr_cluster;\n\n') if clean else ""
    text = ("--\n-- PostgreSQL database cluster dump\n--\n\n"
            "SET default_transaction_read_only = off;\n\n" + drops
            + "CREATE ROLE postgres;\n\n--\n-- Databases\n--\n\n")
    text += _section("template1", "\\connect template1", clean=clean, builtin=True, table=False)
    text += _section("postgres", "\\connect postgres", clean=clean, builtin=True, table=True)
    text += _section("shop", "\\connect shop", clean=clean, builtin=False, table=True)
    text += _section("we ird", "\\connect -reuse-previous=on \"dbname='we ird'\"", clean=clean,
                     builtin=False, table=True)
    text += _section("repmgr_cluster", "\\connect repmgr_cluster", clean=clean, builtin=False,
                     table=True)
    return text + "--\n-- PostgreSQL database cluster dump complete\n--\n\n"


def _index(text: str, chunk: int = 1 << 20) -> DumpIndex:
    indexer = DumpIndexer()
    data = text.encode()
    for i in range(0, len(data), chunk):
        indexer.feed(data[i: i + chunk])
    return indexer.finish()


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_the_indexer_sees_what_the_dump_drops_and_creates(chunk: int) -> None:
    clean = _index(_dump(clean=True), chunk)
    plain = _index(_dump(clean=False), chunk)
    assert clean.fallback is None
    assert plain.fallback is None
    got = {db.name: (db.created, db.dropped, db.entries > 0) for db in clean.databases}
    assert got == {"template1": (True, True, False), "postgres": (True, True, True),
                   "shop": (True, True, True), "we ird": (True, True, True),
                   "repmgr_cluster": (True, True, True)}
    got = {db.name: (db.created, db.dropped, db.entries > 0) for db in plain.databases}
    assert got == {"template1": (False, False, False), "postgres": (False, False, True),
                   "shop": (True, False, True), "we ird": (True, False, True),
                   "repmgr_cluster": (True, False, True)}
    # The fields survive the JSON round trip (the index is kept for resumes and in the marker).
    again = DumpIndex.from_json(plain.to_json())
    assert [(d.created, d.dropped, d.entries) for d in again.databases] == [
        (d.created, d.dropped, d.entries) for d in plain.databases]


def test_a_drop_inside_a_function_body_is_not_taken_for_one() -> None:
    text = _dump(clean=False).replace(
        "CREATE ROLE postgres;",
        "CREATE ROLE postgres;\nSELECT $x$\nDROP DATABASE IF EXISTS shop;\n$x$;")
    assert not any(db.dropped for db in _index(text).databases)


def _existing(**relations: dict[str, int]) -> dict[str, Existing]:
    return {name.replace("_", " ") if name == "we_ird" else name: Existing(
        name.replace("_", " ") if name == "we_ird" else name, rel)
        for name, rel in relations.items()}


def test_a_dump_with_clean_never_collides() -> None:
    index = _index(_dump(clean=True))
    verdict = decide(index, _existing(shop={"table": 3}, postgres={"table": 1},
                                      repmgr_cluster={"table": 4}), replace=False)
    assert not verdict.refused
    assert not verdict.collisions
    assert verdict.dump_fact().startswith("yes (pg_dumpall --clean)")
    assert decide(index, {}, replace=True).to_replace == ()


def test_without_clean_existing_databases_with_objects_refuse() -> None:
    index = _index(_dump(clean=False))
    found = _existing(shop={"table": 3, "sequence": 1}, we_ird={}, repmgr_cluster={"table": 4})
    verdict = decide(index, found, replace=False)
    assert verdict.refused
    assert [e.name for e in verdict.collisions] == ["shop"]  # "we ird" is there, but empty
    assert verdict.restored_over == ("repmgr_cluster",)
    assert verdict.dump_fact().startswith("no (pg_dumpall without --clean): template1, postgres")
    assert "shop (1 sequence, 3 tables)" in verdict.collisions_fact()
    # Nothing there: nothing to collide with.
    assert not decide(index, {}, replace=False).refused


def test_replace_drops_every_database_the_dump_creates_never_postgres() -> None:
    index = _index(_dump(clean=False))
    found = _existing(shop={"table": 3}, we_ird={}, repmgr_cluster={"table": 4}, postgres={})
    verdict = decide(index, found, replace=True)
    assert not verdict.refused
    assert verdict.to_replace == ("shop", "we ird", "repmgr_cluster")
    assert verdict.restored_over == ()
    # postgres is filled, not created, by a dump without --clean: never replaced, so objects
    # there refuse even with the option.
    verdict = decide(index, {**found, **_existing(postgres={"view": 2})}, replace=True)
    assert verdict.refused
    assert [e.name for e in verdict.unreplaceable] == ["postgres"]
    assert "postgres" not in verdict.to_replace


def test_conninfo_quotes_the_name() -> None:
    assert conninfo("shop") == "dbname='shop'"
    assert conninfo("it's a \\ db") == "dbname='it\\'s a \\\\ db'"
    with pytest.raises(ValueError, match="NUL"):
        conninfo("a\x00b")


def test_the_marker_round_trips_and_checks_its_index() -> None:
    index = _index(_dump(clean=False))
    marker = DumpMarker(backup_id="b-1", cipher_size=10, parts=2, plain_size=index.size,
                        plain_sha256="a" * 64, index=index.to_json(), written_by="run")
    again = DumpMarker.from_json(marker.to_json())
    assert again == marker
    assert again.dump_index().size == index.size
    wrong = DumpMarker(**{**marker.__dict__, "plain_size": index.size + 1})
    with pytest.raises(ValueError, match="describes"):
        wrong.dump_index()
    raw = json.loads(marker.to_json())
    with pytest.raises(ValueError, match="sha256"):
        DumpMarker.from_json(json.dumps({**raw, "plain_sha256": "nope"}))
    with pytest.raises(ValueError, match="marker"):
        DumpMarker.from_json(json.dumps({**raw, "version": 99}))


def test_an_invalid_database_the_dump_does_not_drop_refuses_unless_replaced() -> None:
    """A power cut during DROP DATABASE leaves the database invalid (PostgreSQL 15.4+): the
    dump's CREATE DATABASE and \\connect would fail after the point of no return; a --clean
    dump drops it itself, the option drops it first, otherwise the recovery is refused."""
    shop = Existing("shop", invalid=True)
    verdict = decide(_index(_dump(clean=False)), {"shop": shop}, replace=False)
    assert verdict.refused
    assert "shop (invalid: left by an interrupted DROP DATABASE" in verdict.collisions_fact()
    replaced = decide(_index(_dump(clean=False)), {"shop": shop}, replace=True)
    assert not replaced.refused
    assert "shop" in replaced.to_replace
    assert not decide(_index(_dump(clean=True)), {"shop": shop}, replace=False).refused
