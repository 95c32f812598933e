"""Checkpoint settings on the primary for the length of the restore, and putting them back.

Why this module exists: a restore writes the whole database in one go. With a9s-pg's
`max_wal_size` (small VMs: 256 MB) a checkpoint starts every ~135 MB of WAL, and with
`wal_log_hints = on` (a9s sets it for pg_rewind) every page that the index builds and foreign
key checks then read gets a full-page image in the WAL when they set its hint bits, because a
checkpoint ran since the page was loaded. So the restore writes much of the database into the
WAL a second time. Measured (tests' settings, 606 MB dump, 2 sessions, 2 runs each,
alternating): 13.1-13.6 s with the a9s settings, 12.0-12.3 s with `max_wal_size` raised.

While the standbys are stopped (Staging) nothing else depends on these settings, and both are
reloadable (no restart): `ALTER SYSTEM SET max_wal_size`, `checkpoint_timeout`, then reload;
afterwards `ALTER SYSTEM RESET` and reload, before the standbys are re-cloned (so their copy of
`postgresql.auto.conf` is the original one).

Safety:
* `max_wal_size` is a quarter of the free space of the data directory's filesystem at that
  moment, at most 8 GB, and only ever raised.
* A cluster that already has one of these in `postgresql.auto.conf` (someone ran ALTER SYSTEM)
  is left alone: RESET would later remove that person's value.
* A marker file in pgrecovery's state directory on the primary records that the values are
  ours. It is written before the ALTER SYSTEM and removed after the RESET, so a crash at any
  point (or a later run with other status) still finds and reverts them.
"""

from __future__ import annotations

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster import psql
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.state_markers import has_marker, remove_marker, write_marker
from pgrecovery.errors import RemoteCommandFailed

SETTINGS = ("max_wal_size", "checkpoint_timeout")
MAX_WAL_SIZE_CAP_MB = 8192
CHECKPOINT_TIMEOUT = "1h"
MARKER = "bulk-load-settings"

_FREE_MB = r"""
df -B1M --output=avail "$1" | tail -n 1
"""
async def _current(shell: RemoteShell, node: Node,
                   layout: A9sLayout) -> dict[str, tuple[str, str, str]]:
    """name → (setting, unit, sourcefile) from pg_settings."""
    names = ", ".join(psql.quote_literal(n) for n in SETTINGS)
    rows = await psql.query(
        shell, node, layout,
        f"SELECT name, setting, coalesce(unit, ''), coalesce(sourcefile, '') "  # noqa: S608
        f"FROM pg_settings WHERE name IN ({names});")
    return {r[0]: (r[1], r[2], r[3]) for r in rows if len(r) == 4}


def _mb(setting: str, unit: str) -> int:
    """max_wal_size's value in MB (pg_settings reports it in MB on every supported version)."""
    if not setting.isdigit():
        raise RemoteCommandFailed(f"unexpected max_wal_size setting {setting!r}")
    factor = {"MB": 1, "kB": 1 / 1024, "8kB": 8 / 1024, "16MB": 16, "GB": 1024}.get(unit)
    if factor is None:
        raise RemoteCommandFailed(f"unexpected max_wal_size unit {unit!r}")
    return int(int(setting) * factor)


async def apply(shell: RemoteShell, node: Node, layout: A9sLayout) -> str:
    """Raise max_wal_size and checkpoint_timeout for the restore; the outcome in words
    ("applied: …" or "skipped: …"). Idempotent."""
    ours = await has_marker(shell, node, layout, MARKER)
    current = await _current(shell, node, layout)
    if set(current) != set(SETTINGS):
        return f"skipped: pg_settings lacks {sorted(set(SETTINGS) - set(current))}"
    if not ours:
        set_by_hand = [n for n, (_s, _u, src) in current.items()
                       if src.endswith("postgresql.auto.conf")]
        if set_by_hand:
            return (f"skipped: {', '.join(set_by_hand)} already set with ALTER SYSTEM on "
                    f"{node.name}; left as they are")
    res = await shell.run_root(node.endpoint,
                               shell_script_argv(_FREE_MB, layout.data_dir), timeout=30)
    free = res.stdout.strip()
    if not free.isdigit():
        raise RemoteCommandFailed(f"{node.name}: unexpected df output {res.stdout!r}")
    now_mb = _mb(current["max_wal_size"][0], current["max_wal_size"][1])
    want_mb = min(MAX_WAL_SIZE_CAP_MB, int(free) // 4)
    if not ours and want_mb <= now_mb:
        return (f"skipped: max_wal_size is {now_mb} MB already, a quarter of the free space "
                f"is {int(free) // 4} MB")
    if ours:
        # Values of an earlier attempt: keep what it chose (free space has shrunk since).
        want_mb = max(want_mb, now_mb)
    await write_marker(shell, node, layout, MARKER,
                       f"max_wal_size={want_mb}MB checkpoint_timeout={CHECKPOINT_TIMEOUT}")
    # ALTER SYSTEM cannot run in a transaction block: one statement per line, autocommit.
    await psql.execute(shell, node, layout,
                       f"ALTER SYSTEM SET max_wal_size = '{int(want_mb)}MB';\n"
                       f"ALTER SYSTEM SET checkpoint_timeout = '{CHECKPOINT_TIMEOUT}';\n")
    await psql.reload_config(shell, node, layout)
    return (f"applied: max_wal_size {want_mb} MB (was {now_mb} MB), checkpoint_timeout "
            f"{CHECKPOINT_TIMEOUT} (was {current['checkpoint_timeout'][0]} s)")


async def revert(shell: RemoteShell, node: Node, layout: A9sLayout) -> bool:
    """Put the server's own values back if ours are in place; True if it changed anything."""
    if not await has_marker(shell, node, layout, MARKER):
        return False
    await psql.execute(shell, node, layout,
                       "ALTER SYSTEM RESET max_wal_size;\nALTER SYSTEM RESET checkpoint_timeout;\n")
    await psql.reload_config(shell, node, layout)
    await remove_marker(shell, node, layout, MARKER)
    return True

