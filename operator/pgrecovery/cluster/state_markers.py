"""Marker files in pgrecovery's state directory on a VM: "a change of ours is in effect here".

Why this module exists: the restore changes server settings (the checkpoint settings of
`bulk_load`, the wal_level of `wal_free`) that must be put back by whichever run comes next,
even after a crash. Each writes a marker before the change and removes it only after the
revert; both use these three operations. The marker is written to a temporary name and renamed,
so it is either complete or absent. The state directory keeps its default mode: the parallel
restore's work directory below it is read by postgres (a `mkdir -m 0700` here once locked it
out).
"""

from __future__ import annotations

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster.nodes import A9sLayout, Node

_WRITE = r"""
set -eu
mkdir -p "$1"
printf '%s\n' "$3" > "$1/$2.tmp" && mv -f "$1/$2.tmp" "$1/$2"
"""
_EXISTS = r"""
if [ -f "$1/$2" ]; then echo yes; else echo no; fi
"""
_REMOVE = r"""
rm -f -- "$1/$2"
"""


async def write_marker(shell: RemoteShell, node: Node, layout: A9sLayout, name: str,
                       text: str) -> None:
    await shell.run_root(node.endpoint,
                         shell_script_argv(_WRITE, layout.state_dir, name, text), timeout=30)


async def has_marker(shell: RemoteShell, node: Node, layout: A9sLayout, name: str) -> bool:
    res = await shell.run_root(node.endpoint,
                               shell_script_argv(_EXISTS, layout.state_dir, name), timeout=30)
    return res.stdout.strip() == "yes"


async def remove_marker(shell: RemoteShell, node: Node, layout: A9sLayout, name: str) -> None:
    await shell.run_root(node.endpoint, shell_script_argv(_REMOVE, layout.state_dir, name),
                         timeout=30)
