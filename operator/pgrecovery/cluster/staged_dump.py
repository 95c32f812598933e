"""The staged dump's marker: what lets a new run re-use the dump an earlier run left staged.

Why this module exists: a failed recovery keeps the plaintext dump staged on the primary
(`<restore dir>/<backup-id>.dump`, listed in its leftovers) so that the next run can continue.
Re-using it saves the whole of Decrypting's work (download, decrypt, gunzip, upload), but only
if it is exactly what the backup decrypts to — and the new run cannot learn the plain sha256
without decrypting again. So it trusts a marker that only pgrecovery writes:
`<dump>.pgrecovery.json` (root, 0600), written after the stream's sha256 was verified on the VM
(the whole backup's gzip CRC and length were verified before that), holding the backup id, the
ciphertext's size and part count, the plain size and sha256, and the dump index the stream
produced (the parallel restore, the restore proof and the check of existing databases need it;
it holds names and offsets, no data).

A new run re-uses the dump when the marker names the same backup (id, ciphertext size, parts),
carries an index this version reads, and the file on the VM has the marker's size and hashes —
on the VM, now — to the marker's sha256. Anything else (no marker, another backup, a different
size or hash, an unreadable marker or index) → the dump is staged again, and status says why.
Whoever can rewrite the marker is root on the primary and could change the database directly;
the hash catches every change to the dump that does not also rewrite the marker.

Kill-safety: the marker is written (tmp + rename) after the dump is in place; a dump without a
marker is never re-used. Discarding a stale dump removes the marker first, then the dump (and
its old checksum file), and leaves an upload's `.part` for the upload to resume or restart
(it checks the partial file against the stream itself).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster.dump_index import INDEX_VERSION, DumpIndex
from pgrecovery.cluster.nodes import A9sLayout, Node

MARKER_VERSION = 1
MARKER_SUFFIX = ".pgrecovery.json"
# Hashing the staged dump on the VM: `openssl dgst` does ~1 GB/s; a BOSH persistent disk reads
# 100-200 MB/s, so 1 s per 100 MB plus a minute.
SHA256_SECONDS_PER_BYTE = 1 / 100e6

_SHA = re.compile(r"^[0-9a-f]{64}$")

# Prints the dump's size (or "none"), a separator line, then the marker (if any).
_READ = r"""
if [ -f "$1" ]; then stat -c %s -- "$1"; else echo none; fi
echo '--- pgrecovery marker ---'
[ -f "$2" ] && cat -- "$2"
exit 0
"""
_WRITE = r"""
umask 077
cat > "$1.tmp" && mv -f -- "$1.tmp" "$1"
"""
_SHA256 = r"""
if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r "$1"; else sha256sum -- "$1"; fi
"""
# Marker first: from then on nothing claims the dump is good.
_DISCARD = r"""
n=0
for f in "$1" "$1.tmp" "$2" "$2.sha256" "$2.sha256.tmp"; do
  if [ -e "$f" ]; then rm -f -- "$f"; n=$((n+1)); fi
done
echo "$n"
"""


@dataclass(frozen=True)
class DumpMarker:
    """What pgrecovery knows about a dump it staged and verified."""

    backup_id: str
    cipher_size: int
    parts: int
    plain_size: int
    plain_sha256: str
    index: str
    """The `DumpIndex` JSON of the dump (names and byte offsets, no data)."""
    written_by: str = ""
    """The run that staged it (for people reading the file)."""
    version: int = MARKER_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DumpMarker:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != MARKER_VERSION:
            raise ValueError("not a pgrecovery dump marker of this version")
        marker = cls(
            backup_id=str(raw["backup_id"]), cipher_size=int(raw["cipher_size"]),
            parts=int(raw["parts"]), plain_size=int(raw["plain_size"]),
            plain_sha256=str(raw["plain_sha256"]), index=str(raw["index"]),
            written_by=str(raw.get("written_by", "")),
        )
        if not _SHA.match(marker.plain_sha256):
            raise ValueError("the marker's sha256 is malformed")
        return marker

    def dump_index(self) -> DumpIndex:
        """The index it carries; ValueError unless it is of this version and fits the dump."""
        index = DumpIndex.from_json(self.index)
        if index.version != INDEX_VERSION:
            raise ValueError(f"its dump index is of version {index.version}, not {INDEX_VERSION}")
        if index.size != self.plain_size:
            raise ValueError(f"its dump index describes {index.size} bytes, the dump has "
                             f"{self.plain_size}")
        return index


@dataclass(frozen=True)
class Reuse:
    """The verdict on a dump found staged for the backup."""

    marker: DumpMarker | None
    """Set when the dump can be re-used as it is."""
    why_not: str = ""
    """Why it cannot (empty when it can, or when nothing was staged)."""
    found: bool = False
    """A dump or a marker of this backup was on the primary."""


def marker_path(layout: A9sLayout, backup_id: str) -> str:
    return layout.dump_path(backup_id) + MARKER_SUFFIX


async def write_marker(shell: RemoteShell, node: Node, layout: A9sLayout,
                       marker: DumpMarker) -> None:
    """Record a staged, verified dump (call only after its sha256 was verified on the VM)."""
    await shell.run_root(node.endpoint,
                         shell_script_argv(_WRITE, marker_path(layout, marker.backup_id)),
                         input=marker.to_json(), timeout=120)


async def check_reusable(  # noqa: PLR0911 - one exit per reason not to re-use
    shell: RemoteShell, node: Node, layout: A9sLayout, *, backup_id: str, cipher_size: int,
    parts: int,
) -> Reuse:
    """Whether the dump staged for `backup_id` is the backup's dump (read-only; hashes it)."""
    dump = layout.dump_path(backup_id)
    res = await shell.run_root(node.endpoint,
                               shell_script_argv(_READ, dump, marker_path(layout, backup_id)),
                               timeout=120)
    head, _, text = res.stdout.partition("--- pgrecovery marker ---\n")
    size_text = head.strip()
    size = int(size_text) if size_text.isdigit() else None
    found = size is not None or bool(text.strip())
    if size is None:
        return Reuse(None, "no dump staged" if not found else "the marker has no dump", found)
    if not text.strip():
        return Reuse(None, "the staged dump has no pgrecovery marker (an upload cut short, "
                           "or not staged by pgrecovery)", found)
    try:
        marker = DumpMarker.from_json(text)
        marker.dump_index()
    except (ValueError, KeyError, TypeError) as exc:
        return Reuse(None, f"its marker is unusable ({str(exc)[:200]})", found)
    if (marker.backup_id, marker.cipher_size, marker.parts) != (backup_id, cipher_size, parts):
        return Reuse(None, f"its marker describes another backup ({marker.backup_id}, "
                           f"{marker.cipher_size} B in {marker.parts} part(s); this one: "
                           f"{cipher_size} B in {parts})", found)
    if size != marker.plain_size:
        return Reuse(None, f"the file has {size} B, its marker says {marker.plain_size} B",
                     found)
    digest = await staged_sha256(shell, node, dump, size)
    if digest != marker.plain_sha256:
        return Reuse(None, f"its sha256 on the VM is {digest}, its marker says "
                           f"{marker.plain_sha256}", found)
    return Reuse(marker, "", found)


async def staged_sha256(shell: RemoteShell, node: Node, path: str, size: int) -> str:
    res = await shell.run_root(node.endpoint, shell_script_argv(_SHA256, path),
                               timeout=60 + size * SHA256_SECONDS_PER_BYTE)
    digest = res.stdout.split(maxsplit=1)[0] if res.stdout.strip() else ""
    return digest if _SHA.match(digest) else f"unreadable ({res.stdout[:80]!r})"


async def discard(shell: RemoteShell, node: Node, layout: A9sLayout, backup_id: str) -> int:
    """Remove a staged dump that is not to be re-used, marker first (keeps an upload's
    `.part`); returns how many files went."""
    res = await shell.run_root(
        node.endpoint,
        shell_script_argv(_DISCARD, marker_path(layout, backup_id), layout.dump_path(backup_id)),
        timeout=120,
    )
    out = res.stdout.strip()
    return int(out) if out.isdigit() else 0


def staged_files(layout: A9sLayout, backup_id: str) -> list[str]:
    """Every file a staged dump consists of (leftovers, the staging file's removal)."""
    dump = layout.dump_path(backup_id)
    marker = marker_path(layout, backup_id)
    return [dump, f"{dump}.part", f"{dump}.sha256", f"{dump}.sha256.tmp", marker, f"{marker}.tmp"]
