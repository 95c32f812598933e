"""The step journal on a VM: which once-only operations of a run are done.

Why this module exists: a few operations cannot tell from the cluster whether they already ran
(applying the new site's roles SQL, extracting a base backup, configuring recovery), so they
leave a mark under `<journal dir>/<run id>/<operation>` when done and check it first. The a9s-pg
and the physical operations used to carry a copy each.

Decisions recorded here:
- The journal is on the VM's persistent disk (the state directory), so it outlives an operator
  restart and a reboot; `cluster.leftovers` removes it with the rest of the run's files.
- The mark holds only the time it was written (nothing of the cluster's data).
"""

from __future__ import annotations

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster.nodes import A9sLayout, Node, validate_run_id


def _run_dir(layout: A9sLayout, run_id: str) -> str:
    return f"{layout.journal_dir}/{validate_run_id(run_id)}"


async def journal_has(shell: RemoteShell, node: Node, layout: A9sLayout, run_id: str,
                      name: str) -> bool:
    res = await shell.run_root(node.endpoint, ["test", "-e", f"{_run_dir(layout, run_id)}/{name}"],
                               timeout=30, check=False)
    return res.exit_status == 0


async def journal_mark(shell: RemoteShell, node: Node, layout: A9sLayout, run_id: str,
                       name: str) -> None:
    await shell.run_root(node.endpoint, shell_script_argv(
        'mkdir -p -m 0700 -- "$1" && date -u +%FT%TZ > "$1/$2"', _run_dir(layout, run_id), name),
        timeout=60)
