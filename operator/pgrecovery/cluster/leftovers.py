"""What a recovery leaves on the VMs, listed with sizes, and removed.

Why this module exists: a recovery writes to every node — job directories with their logs
(`<state dir>/jobs/`), the step journal, the parallel restore's work directory (its task logs
can quote rows of the dump), the clone marker `pgrecovery-run-id` in every data directory — and
stages the plaintext dump (every role's password hash) on the primary. None of it may stay once
the recovery has succeeded or been deleted. One place knows the whole list, so the success step,
the deletion and `pgrecovery cleanup` remove the same things, and a failed run can say in its
status exactly what it keeps for the next run.

Decisions:
- The whole state directory goes, except `KEPT`: the bulk-load and WAL-free markers
  (`cluster.bulk_load`, `cluster.wal_free`: while one exists the primary still runs with a
  restore's settings, and the marker is what lets the next run put them back; the revert
  removes it) and a WAL-E recovery's saved configuration.
- The staging directory is removed only when empty: people (and the runbook) keep files there.
- Paths come from the layout (validated) and the backup id (validated); the script gets them as
  arguments, never spliced into its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster import bulk_load, staged_dump, wal_free
from pgrecovery.cluster.a9s import CLONE_MARKER
from pgrecovery.cluster.nodes import A9sLayout, Node, validate_backup_id

# Lists (mode "list") or removes (mode "remove") pgrecovery's files on one node; prints one
# "<bytes> <path>" line per thing found. Arguments: mode, state dir, names to keep in it, the
# clone marker's path, staging dir, then the staged dump's files (none when no backup is pinned).
_SCRIPT = r"""
mode=$1; state=$2; keep=$3; marker=$4; staging=$5; shift 5
size() { du -sb -- "$1" 2>/dev/null | cut -f1; }
one() {
  [ -e "$1" ] || return 0
  echo "$(size "$1") $1"
  [ "$mode" = remove ] && rm -rf -- "$1"
  return 0
}
one "$marker"
for f in "$@"; do one "$f"; done
if [ -d "$state" ]; then
  for e in "$state"/* "$state"/.[!.]*; do
    [ -e "$e" ] || continue
    case " $keep " in *" ${e##*/} "*)
      # Kept while it holds something; listed, so a failed run says it is there.
      if [ "$mode" = remove ]; then rmdir -- "$e" 2>/dev/null; continue; fi ;;
    esac
    one "$e"
  done
  [ "$mode" = remove ] && rmdir -- "$state" 2>/dev/null
fi
[ "$mode" = remove ] && rmdir -- "$staging" 2>/dev/null
exit 0
"""


# Kept in the state directory: records of a change to the cluster that is still in effect,
# which whoever repairs it needs — the bulk-load and WAL-free markers (the primary still has a
# restore's checkpoint settings, or wal_level minimal) and the WAL-E recovery's saved
# configuration (`physical.py`; removed by that plan's own step once the recovery succeeded).
KEPT = (bulk_load.MARKER, wal_free.MARKER, "config")


@dataclass(frozen=True)
class Leftover:
    node: str
    path: str
    size: int

    def __str__(self) -> str:
        return f"{self.node}:{self.path} ({self.size} B)"


def _staged_files(layout: A9sLayout, backup_id: str | None) -> list[str]:
    if not backup_id:
        return []
    return staged_dump.staged_files(layout, validate_backup_id(backup_id))


async def _on_node(shell: RemoteShell, node: Node, layout: A9sLayout, backup_id: str | None,
                   mode: str) -> list[Leftover]:
    argv = shell_script_argv(_SCRIPT, mode, layout.state_dir, " ".join(KEPT),
                             f"{layout.data_dir}/{CLONE_MARKER}", layout.restore_dir,
                             *_staged_files(layout, backup_id))
    result = await shell.run_root(node.endpoint, argv, timeout=300)
    found: list[Leftover] = []
    for line in result.stdout.splitlines():
        size, _, path = line.partition(" ")
        if path:
            found.append(Leftover(node.name, path, int(size) if size.isdigit() else 0))
    return found


async def _on_nodes(shell: RemoteShell, nodes: Sequence[Node], layout: A9sLayout,
                    backup_id: str | None, mode: str) -> list[Leftover]:
    found: list[Leftover] = []
    for node in nodes:
        found += await _on_node(shell, node, layout, backup_id, mode)
    return found


async def list_leftovers(shell: RemoteShell, nodes: Sequence[Node], layout: A9sLayout,
                         backup_id: str | None) -> list[Leftover]:
    """What pgrecovery has on the nodes now (read-only)."""
    return await _on_nodes(shell, nodes, layout, backup_id, "list")


async def remove_leftovers(shell: RemoteShell, nodes: Sequence[Node], layout: A9sLayout,
                           backup_id: str | None) -> list[Leftover]:
    """Remove them (idempotent: a second call finds nothing); returns what was removed."""
    return await _on_nodes(shell, nodes, layout, backup_id, "remove")
