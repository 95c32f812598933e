"""`wal_level = minimal` on the primary for the length of the restore, and putting it back.

Why this module exists: with `wal_level = minimal`, a table created or truncated in the same
transaction as its `COPY` is written without WAL (PostgreSQL ≥ 13 syncs the file at commit
instead), `COPY … FREEZE` stores its rows frozen (no hint-bit rewrites by the index builds and
FK checks later, which with a9s-pg's `wal_log_hints = on` cost full-page images), and index
builds skip WAL too. The restore writes the database once instead of twice.

`minimal` is allowed only while nothing streams from the primary: `max_wal_senders = 0` and
`archive_mode = off` go with it, and PostgreSQL refuses to start at all while a replication
slot exists. Staging has stopped the standbys and dropped their (inactive) slots; a slot still
there (someone else's, or an active one) makes `apply` skip instead of risking a primary that
does not come back. All three need a restart, done through monit like everything else
(`monit stop/start postgresql-ha`; repmgr is stopped on the primary since Staging).

Put back before the standbys are re-cloned: `pg_basebackup` needs `replica` and a WAL sender.

Safety (as `bulk_load`):
* A cluster that already has one of the three in `postgresql.auto.conf` (someone ran ALTER
  SYSTEM) is left alone: RESET would later remove that person's value.
* A marker file in pgrecovery's state directory on the primary records that the values are
  ours (and what they were). It is written before the ALTER SYSTEM and removed only after the
  RESET and the restart, so a failure or kill at any point leaves the marker, and whichever run
  comes next (its revert step runs whether or not it uses the WAL-free load itself) puts the
  settings back.
"""

from __future__ import annotations

import asyncio

from pgrecovery.adapters.ssh import RemoteShell
from pgrecovery.cluster import monit, psql
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.state_markers import has_marker, remove_marker, write_marker
from pgrecovery.errors import NotReadyYet, RemoteCommandFailed

SETTINGS = {"wal_level": "minimal", "max_wal_senders": "0", "archive_mode": "off"}
MARKER = "wal-free-settings"
# The restarted server recovers from its last checkpoint; with the restore's raised
# checkpoint distance that can take a while on a big disk.
CONNECT_TIMEOUT = 300.0
CONNECT_INTERVAL = 0.25

async def _current(shell: RemoteShell, node: Node,
                   layout: A9sLayout) -> dict[str, tuple[str, str]]:
    """name → (setting, sourcefile) from pg_settings."""
    names = ", ".join(psql.quote_literal(n) for n in SETTINGS)
    rows = await psql.query(
        shell, node, layout,
        f"SELECT name, setting, coalesce(sourcefile, '') "  # noqa: S608 - literals quoted
        f"FROM pg_settings WHERE name IN ({names});")
    return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3}


async def _slots(shell: RemoteShell, node: Node, layout: A9sLayout) -> list[str]:
    rows = await psql.query(shell, node, layout,
                            "SELECT slot_name FROM pg_replication_slots ORDER BY 1;")
    return [r[0] for r in rows if r]


async def _wait_connectable(shell: RemoteShell, node: Node, layout: A9sLayout) -> None:
    """monit says OK as soon as the process runs; crash recovery may still be going on."""
    deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
    while True:
        try:
            await psql.query(shell, node, layout, "SELECT 1;", timeout=30)
        except RemoteCommandFailed as exc:
            if not psql.is_connection_failure(exc):
                raise
            if asyncio.get_running_loop().time() >= deadline:
                raise NotReadyYet(f"{node.name}: PostgreSQL does not accept connections "
                                  f"{CONNECT_TIMEOUT:.0f} s after its restart") from exc
            await asyncio.sleep(CONNECT_INTERVAL)
            continue
        return


async def _restart(shell: RemoteShell, node: Node, layout: A9sLayout) -> None:
    await monit.ensure_stopped(shell, node, layout, [layout.pg_service])
    await monit.ensure_started(shell, node, layout, [layout.pg_service])
    await _wait_connectable(shell, node, layout)


async def apply(shell: RemoteShell, node: Node, layout: A9sLayout) -> str:
    """Switch the primary to the WAL-free settings (restart); the outcome in words
    ("applied: …" or "skipped: …"). Idempotent: a second call finds them in effect."""
    ours = await has_marker(shell, node, layout, MARKER)
    current = await _current(shell, node, layout)
    if set(current) != set(SETTINGS):
        return f"skipped: pg_settings lacks {sorted(set(SETTINGS) - set(current))}"
    if ours and all(current[n][0] == v for n, v in SETTINGS.items()):
        return "applied: " + ", ".join(f"{n} {v}" for n, v in SETTINGS.items())
    if not ours:
        set_by_hand = [n for n, (_s, src) in current.items()
                       if src.endswith("postgresql.auto.conf")]
        if set_by_hand:
            return (f"skipped: {', '.join(set_by_hand)} already set with ALTER SYSTEM on "
                    f"{node.name}; left as they are")
        if current["wal_level"][0] == "minimal":
            return "skipped: wal_level is minimal already"
    slots = await _slots(shell, node, layout)
    if slots:
        # PostgreSQL does not start with wal_level minimal while a slot exists.
        return (f"skipped: replication slots {', '.join(slots)[:200]} exist on {node.name}; "
                "wal_level stays as it is")
    was = ", ".join(f"{n} {current[n][0]}" for n in SETTINGS)
    await write_marker(shell, node, layout, MARKER, f"was: {was}")
    # ALTER SYSTEM cannot run in a transaction block: one statement per line, autocommit.
    await psql.execute(shell, node, layout, "".join(
        f"ALTER SYSTEM SET {n} = {psql.quote_literal(v)};\n" for n, v in SETTINGS.items()))
    await _restart(shell, node, layout)
    after = await _current(shell, node, layout)
    wrong = [f"{n} is {after.get(n, ('?', ''))[0]}" for n, v in SETTINGS.items()
             if after.get(n, ("", ""))[0] != v]
    if wrong:
        raise RemoteCommandFailed(f"{node.name}: after the restart {', '.join(wrong)}; the "
                                  "WAL-free settings did not take effect")
    return ("applied: " + ", ".join(f"{n} {v}" for n, v in SETTINGS.items())
            + f" (was {was})")


async def revert(shell: RemoteShell, node: Node, layout: A9sLayout) -> bool:
    """Put the server's own values back if ours are (or may be) in place, restarting it; True
    if it changed anything. A server found stopped (a kill during our restart) is started
    first: ALTER SYSTEM needs it."""
    if not await has_marker(shell, node, layout, MARKER):
        return False
    await monit.ensure_started(shell, node, layout, [layout.pg_service])
    await _wait_connectable(shell, node, layout)
    await psql.execute(shell, node, layout,
                       "".join(f"ALTER SYSTEM RESET {n};\n" for n in SETTINGS))
    await _restart(shell, node, layout)
    after = await _current(shell, node, layout)
    if after.get("wal_level", ("", ""))[0] == "minimal":
        raise RemoteCommandFailed(f"{node.name}: wal_level is still minimal after ALTER SYSTEM "
                                  "RESET and a restart (set in postgresql.conf?)")
    await remove_marker(shell, node, layout, MARKER)
    return True
