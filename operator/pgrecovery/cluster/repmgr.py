"""repmgr's view of the cluster: parse `repmgr cluster show` (table and `--csv`).

Why this module exists: the primary found with `pg_is_in_recovery()` is cross-checked with
repmgr (formats.md, "Finding the primary"), and the final verification needs every node
`running` in repmgr. The table (repmgr 5.3) has the columns ID | Name | Role | Status |
Upstream | Location | Priority | Timeline | Connection string; statuses `* running`,
`  running`, `! running as standby`, `? unreachable`, `! failed`. `--csv` prints
`node_id,connection_status,recovery_type` (repmgr 5; 4.x prints only the first two):
connection 0 = reachable, -1 = not; recovery 0 = primary, 1 = standby, -1 = unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.errors import RemoteCommandFailed

# repmgr exits 25 (ERR_NODE_STATUS) when it found problems but still printed the table.
EXIT_NODE_STATUS = 25


@dataclass(frozen=True)
class RepmgrNode:
    node_id: int
    name: str
    role: str
    """`primary`, `standby`, `witness`, `bdr`."""
    status: str
    """Status without the marker: `running`, `running as standby`, `unreachable`, `failed`…"""
    marker: str
    """`*` (this node is primary and running), `!` (problem), `?` (unreachable) or ``."""
    upstream: str
    conninfo: str
    timeline: str = ""

    @property
    def host(self) -> str | None:
        """`host=` of the connection string (how the row maps to a VM address)."""
        match = re.search(r"(?:^|\s)host=(\S+)", self.conninfo)
        return match.group(1).strip("'\"") if match else None

    @property
    def healthy(self) -> bool:
        return self.status == "running" and self.marker in ("*", "")


@dataclass(frozen=True)
class RepmgrCsvRow:
    node_id: int
    reachable: bool
    recovery: str
    """`primary`, `standby` or `unknown`."""


def parse_cluster_show(text: str) -> list[RepmgrNode]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header_idx = next(
        (i for i, ln in enumerate(lines) if "|" in ln and re.search(r"\bName\b", ln)
         and re.search(r"\bRole\b", ln)),
        None,
    )
    if header_idx is None:
        return []
    headers = [h.strip().lower() for h in lines[header_idx].split("|")]
    rows: list[RepmgrNode] = []
    for line in lines[header_idx + 1:]:
        if set(line.strip()) <= set("-+"):
            continue
        if "|" not in line:
            break  # warnings after the table ("WARNING: following issues were detected")
        cells = [c.strip() for c in line.split("|", len(headers) - 1)]
        if len(cells) < len(headers):
            continue
        row = dict(zip(headers, cells, strict=False))
        status_cell = row.get("status", "")
        marker = status_cell[0] if status_cell[:1] in ("*", "!", "?") else ""
        status = status_cell[1:].strip() if marker else status_cell
        try:
            node_id = int(row.get("id", ""))
        except ValueError:
            continue
        rows.append(
            RepmgrNode(
                node_id=node_id,
                name=row.get("name", ""),
                role=row.get("role", ""),
                status=status,
                marker=marker,
                upstream=row.get("upstream", ""),
                conninfo=row.get("connection string", ""),
                timeline=row.get("timeline", ""),
            )
        )
    return rows


def parse_cluster_show_csv(text: str) -> list[RepmgrCsvRow]:
    recovery = {"0": "primary", "1": "standby", "-1": "unknown"}
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        rows.append(
            RepmgrCsvRow(
                node_id=int(parts[0]),
                reachable=parts[1] == "0",
                recovery=recovery.get(parts[2], "unknown") if len(parts) > 2 else "unknown",
            )
        )
    return rows


# vars.sh on the simulated job exports REPMGR_CONFIG; when a real job does not, the layout's
# path is used. repmgr refuses to run as root, hence chpst.
_CLUSTER_SHOW = r"""
source "$1"
exec chpst -u postgres:vcap repmgr -f "${REPMGR_CONFIG:-$2}" cluster show "${@:3}"
"""


def cluster_show_argv(layout: A9sLayout, *, csv: bool = False) -> list[str]:
    extra = ["--csv"] if csv else []
    return shell_script_argv(_CLUSTER_SHOW, layout.vars_sh, layout.repmgr_config, *extra)


async def cluster_show(shell: RemoteShell, node: Node, layout: A9sLayout) -> list[RepmgrNode]:
    """`repmgr cluster show` on `node`; an exit 25 with a table is data, not a failure."""
    res = await shell.run_root(node.endpoint, cluster_show_argv(layout), timeout=60, check=False)
    rows = parse_cluster_show(res.stdout)
    if res.exit_status == 1 and "no node records were found" in res.stderr + res.stdout:
        return []  # an emptied repmgr schema (after the runbook's TRUNCATE)
    if res.exit_status not in (0, EXIT_NODE_STATUS) or (res.exit_status and not rows):
        raise RemoteCommandFailed(
            f"{node.name}: `repmgr cluster show` exited {res.exit_status}: "
            f"{(res.stderr or res.stdout).strip()[:400]}",
            exit_status=res.exit_status,
            stderr=res.stderr[:400],
        )
    return rows


def match_row(rows: list[RepmgrNode], node: Node) -> RepmgrNode | None:
    """The repmgr row of a VM: by `host=` in the connection string, else by name."""
    for row in rows:
        if row.host and row.host.lower() == node.address.lower():
            return row
    for row in rows:
        if row.name in (node.name, node.name.replace("/", "-")):
            return row
    return None
