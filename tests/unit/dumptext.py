"""A small pg_dumpall script shaped exactly like PostgreSQL 15.18's output, for unit tests of
the dump indexer and the restore script generator (no server needed).

Built from parts so tests can vary one thing (an extra meta-command, a large object, a
truncated COPY, …). The text follows a real `pg_dumpall --clean --if-exists` dump: `\\restrict`
lines, the DROP/CREATE DATABASE part before `\\connect`, the repeated preamble, entry headers,
`SET default_tablespace` lines between entries. The COPY rows, a function body and a comment
contain text that looks like headers, COPY statements, `\\connect` lines and terminators.
"""

from __future__ import annotations

GLOBALS = """--
-- PostgreSQL database cluster dump
--

\\restrict AAAA

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Drop databases (except postgres and template1)
--

DROP DATABASE IF EXISTS shop;




--
-- Drop roles
--

DROP ROLE IF EXISTS app;
DROP ROLE IF EXISTS postgres;


--
-- Roles
--

CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;

\\unrestrict AAAA

--
-- Databases
--

"""

PREAMBLE = """SET statement_timeout = 0;
SET lock_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET client_min_messages = warning;

"""


def database(name: str, body: str, *, connect: str | None = None, clean: bool = False) -> str:
    """One `-- Database "x" dump` section with `body` after the \\connect and preamble."""
    connect = connect or f"\\connect {name}"
    drop = f"DROP DATABASE {name};\n" if clean else ""
    return (
        f"--\n-- Database \"{name}\" dump\n--\n\n--\n-- PostgreSQL database dump\n--\n\n"
        f"\\restrict BBBB\n\n-- Dumped from database version 15.18\n"
        f"-- Dumped by pg_dump version 15.18\n\n{PREAMBLE}{drop}"
        f"--\n-- Name: {name}; Type: DATABASE; Schema: -; Owner: postgres\n--\n\n"
        f"CREATE DATABASE {name} WITH TEMPLATE = template0 ENCODING = 'UTF8';\n\n\n"
        f"ALTER DATABASE {name} OWNER TO postgres;\n\n"
        f"\\unrestrict BBBB\n{connect}\n\\restrict BBBB\n\n{PREAMBLE}{body}"
        f"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict BBBB\n\n"
    )


def entry(name: str, type_: str, sql: str, schema: str = "public", *,
          data: bool = False) -> str:
    prefix = "Data for " if data else ""
    header = f"-- {prefix}Name: {name}; Type: {type_}; Schema: {schema}; Owner: app"
    return f"--\n{header}\n--\n\n{sql}\n\n"


TRICKY_ROWS = (
    "1\t-- Name: x; Type: TABLE; Schema: public; Owner: app\n"
    "2\tCOPY public.other (a) FROM stdin;\n"
    "3\t\\\\connect evil\n"
    "4\t\\\\.\n"
    "5\t--\n"
    "6\t\\N\n"
)

ORDERS_ROWS = "".join(f"{i}\t{i % 7}\torder {i} 'quoted' $$ dollars\n" for i in range(1, 400))

PRE_DATA = (
    entry("sales", "SCHEMA", "CREATE SCHEMA sales;\n\n\nALTER SCHEMA sales OWNER TO app;", "-")
    + entry("touch()", "FUNCTION",
            "CREATE FUNCTION public.touch() RETURNS trigger\n    LANGUAGE plpgsql\n"
            "    AS $_$\nBEGIN\n--\n-- Name: fake; Type: TABLE; Schema: public; Owner: x\n--\n"
            "  RAISE NOTICE 'it''s; \\connect x';\n  RETURN NEW;\nEND $_$;")
    + "SET default_tablespace = '';\n\nSET default_table_access_method = heap;\n\n"
    + entry("customers", "TABLE",
            "CREATE TABLE public.customers (\n    id integer NOT NULL,\n    note text DEFAULT "
            "E'a\\'b;\\n-- Name: q'\n);\n\n\nALTER TABLE public.customers OWNER TO app;")
    + entry("orders", "TABLE",
            "CREATE TABLE public.orders (\n    id integer NOT NULL,\n    customer integer\n);")
    + entry("TABLE orders", "COMMENT",
            "COMMENT ON TABLE public.orders IS 'two\n--\n-- Name: no; Type: INDEX; Schema: a; "
            "Owner: b\n--\nlines';")
)

DATA = (
    entry("customers", "TABLE DATA",
          f"COPY public.customers (id, note) FROM stdin;\n{TRICKY_ROWS}\\.", data=True)
    + entry("orders", "TABLE DATA",
            f"COPY public.orders (id, customer, note) FROM stdin;\n{ORDERS_ROWS}\\.", data=True)
    + entry("empty", "TABLE DATA", "COPY public.empty (id) FROM stdin;\n\\.", data=True)
    + entry("orders_id_seq", "SEQUENCE SET",
            "SELECT pg_catalog.setval('public.orders_id_seq', 399, true);")
)

POST_DATA = (
    entry("customers customers_pkey", "CONSTRAINT",
          "ALTER TABLE ONLY public.customers\n    ADD CONSTRAINT customers_pkey PRIMARY KEY (id);")
    + "SET default_tablespace = fast;\n\n"
    + entry("orders_customer", "INDEX",
            "CREATE INDEX orders_customer ON public.orders USING btree (customer);")
    + "SET default_tablespace = '';\n\n"
    + entry("orders_id", "INDEX", "CREATE INDEX orders_id ON public.orders USING btree (id);")
    + entry("INDEX orders_id", "COMMENT", "COMMENT ON INDEX public.orders_id IS 'by id';")
    + entry("orders orders_customer_fkey", "FK CONSTRAINT",
            "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_customer_fkey FOREIGN KEY "
            "(customer) REFERENCES public.customers(id);")
    + entry("orders_late", "INDEX", "CREATE INDEX orders_late ON public.orders (id, customer);")
    + entry("TABLE orders", "ACL", "GRANT SELECT ON TABLE public.orders TO app;")
)

TEMPLATE1 = database(
    "template1",
    entry("DATABASE template1", "COMMENT",
          "COMMENT ON DATABASE template1 IS 'default template for new databases';", "-"),
    clean=True,
)

TRAILER = "--\n-- PostgreSQL database cluster dump complete\n--\n\n"


def dump(*, shop_pre: str = PRE_DATA, shop_data: str = DATA, shop_post: str = POST_DATA,
         extra: str = "", globals_: str = GLOBALS) -> bytes:
    shop = database("shop", shop_pre + shop_data + shop_post)
    return (globals_ + TEMPLATE1 + shop + extra + TRAILER).encode()
