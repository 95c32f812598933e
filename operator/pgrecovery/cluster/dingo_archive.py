"""The new Dingo instance's WAL-E archive: empty it, then clone the deleted instance's into it.

Why this module exists: the runbook's `aws s3 rm $target --recursive` + `aws s3 sync $source
$target` is where a Dingo recovery silently goes wrong. `sync` skips objects that already exist
at the destination (same size, newer time), so the new instance's own `sysids/sysid` and its
first base backup can survive and be restored instead of the user's data (formats.md). Here the
destination is emptied first (and checked empty), every source object is copied server-side
(the bytes never pass through the operator), and the result is verified: the destination holds
exactly the source's relative keys with the same sizes (and the same ETags where both are plain
MD5s), nothing more, nothing less.

Both steps are idempotent: emptying an empty prefix does nothing; a clone resumed after a crash
copies only what is missing or differs, and always ends with the full verification.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pgrecovery.adapters.objectstore import ObjectInfo, WritableObjectStore
from pgrecovery.errors import BackupIncomplete, BackupNotFound, FatalError

# A plain (single-part) S3 ETag is the MD5 of the content; multipart ETags (`…-N`) depend on
# the part size, so a server-side multipart copy may legitimately differ from its source.
_PLAIN_ETAG = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class PrefixSummary:
    objects: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.objects} object(s), {self.bytes} bytes"


@dataclass(frozen=True)
class CloneResult:
    copied: int
    """Objects copied by this call (0 when a resumed clone found everything in place)."""
    copied_bytes: int
    total: PrefixSummary
    """What the destination holds afterwards (= the source)."""


ProgressFn = Callable[[int, int, str], Awaitable[None]]
"""(bytes done, bytes total, detail), awaited after each object."""


def summarize(objects: list[ObjectInfo]) -> PrefixSummary:
    return PrefixSummary(len(objects), sum(o.size for o in objects))


def _check_prefixes(source: str, dest: str) -> None:
    for name, prefix in (("source", source), ("destination", dest)):
        if not prefix.endswith("/") or prefix.startswith("/") or prefix == "/":
            raise FatalError(f"{name} prefix {prefix!r} must be a key prefix ending in '/'")
    # Emptying a prefix that contains the source (or is inside it) would destroy the backup.
    if source.startswith(dest) or dest.startswith(source):
        raise FatalError(
            f"the archive prefixes overlap ({source!r}, {dest!r}): refusing to empty or copy",
            reason="InvalidSpec",
        )


def _same(src: ObjectInfo, dst: ObjectInfo) -> bool:
    if src.size != dst.size:
        return False
    if src.etag and dst.etag and _PLAIN_ETAG.match(src.etag) and _PLAIN_ETAG.match(dst.etag):
        return src.etag == dst.etag
    return True


async def empty_prefix(store: WritableObjectStore, dest: str, *, protect: str) -> PrefixSummary:
    """Delete every object under `dest` and check that none is left; returns what was there.
    `protect` (the source prefix) must not overlap `dest`."""
    _check_prefixes(protect, dest)
    found = await store.list(dest)
    if found:
        await store.delete([o.key for o in found])
    left = await store.list(dest)
    if left:
        raise FatalError(
            f"{len(left)} object(s) still under {store.description}/{dest} after deleting; is "
            f"something still writing there (first: {left[0].key})?",
            reason="ArchiveNotEmpty",
        )
    return summarize(found)


async def verify_clone(store: WritableObjectStore, source: str, dest: str) -> PrefixSummary:
    """The destination equals the source: same relative keys, same sizes (and plain ETags)."""
    src = {o.key[len(source) :]: o for o in await store.list(source)}
    dst = {o.key[len(dest) :]: o for o in await store.list(dest)}
    missing = sorted(set(src) - set(dst))
    extra = sorted(set(dst) - set(src))
    differ = sorted(k for k in set(src) & set(dst) if not _same(src[k], dst[k]))
    if missing or extra or differ:
        details = "; ".join(
            f"{what}: {len(keys)} (first {keys[0]})"
            for what, keys in (("missing", missing), ("extra", extra), ("differ", differ))
            if keys
        )
        raise BackupIncomplete(
            f"the copy in {store.description}/{dest} does not match {source}: {details}"
        )
    return summarize(list(src.values()))


async def clone_prefix(
    store: WritableObjectStore, source: str, dest: str, *, progress: ProgressFn | None = None
) -> CloneResult:
    """Copy every object under `source` to the same relative key under `dest` (server-side),
    skipping those already there with the same size/ETag, then verify the whole destination."""
    _check_prefixes(source, dest)
    src = await store.list(source)
    if not src:
        raise BackupNotFound(f"nothing to copy: {store.description}/{source} is empty")
    have = {o.key[len(dest) :]: o for o in await store.list(dest)}
    total = sum(o.size for o in src)
    done = copied = copied_bytes = 0
    for obj in src:
        rel = obj.key[len(source) :]
        existing = have.get(rel)
        if existing is None or not _same(obj, existing):
            result = await store.copy(obj.key, dest + rel, size=obj.size)
            if not _same(obj, result):
                raise BackupIncomplete(
                    f"copy of {obj.key} to {dest}{rel} has {result.size} bytes "
                    f"(ETag {result.etag}); the source has {obj.size} (ETag {obj.etag})"
                )
            copied += 1
            copied_bytes += obj.size
        done += obj.size
        if progress is not None:
            await progress(done, total, f"cloned {rel}")
    return CloneResult(copied, copied_bytes, await verify_clone(store, source, dest))
