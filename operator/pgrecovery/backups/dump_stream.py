"""The decrypted dump as one replayable stream: store → decrypt → gunzip, watched by taps.

Why this module exists: the logical plan uploads the plain dump to the primary while it is
being fetched and decrypted (one pipeline, `CachedStoreSource`). The SSH upload resumes after a
dropped connection only from a *replayable* source — one that can produce the same bytes again
from an offset (`adapters.ssh.ReplayableSource`). Decryption is deterministic and the parts
fetched so far are kept on the work volume, so replaying means decrypting again from the start
(fast, local) and skipping what the VM already has.

Taps see every byte of every replay from byte 0 (also the skipped prefix), so something that
must observe the whole dump — the index of its sections for the parallel restore — is always
complete for the pass that reached the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.cached_source import CachedStoreSource
from pgrecovery.backups.config import Digest, EncryptionKey
from pgrecovery.backups.listing import Backup
from pgrecovery.backups.pipeline import decrypt_stream
from pgrecovery.backups.progress import Progress


class Tap(Protocol):
    """Sees the plain dump from its first byte; `finish` is called when a pass reached the end."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


@dataclass
class StageCounters:
    """Per-stage bytes of the current pass, for status: what the pipeline did so far."""

    cipher_total: int = 0
    fetched: int = 0  # ciphertext received from the store in this pass
    reused: int = 0  # ciphertext read back from parts kept on the work volume
    decrypted: int = 0  # ciphertext consumed by the decryptor
    plain: int = 0  # plain dump bytes produced (decrypted and decompressed)
    sent: int = 0  # plain dump bytes handed to the upload (after a resume's skip)
    passes: int = 0


@dataclass
class ReplayableDump:
    """`open_at(offset)` yields the plain dump from `offset`; every call is a fresh pass."""

    store: ObjectStore
    backup: Backup
    parts_dir: Path
    key: EncryptionKey
    digest: Digest
    make_taps: Callable[[], list[Tap]] = list
    on_progress: Callable[[StageCounters], None] = lambda _c: None
    counters: StageCounters = field(default_factory=StageCounters)

    async def open_at(self, offset: int) -> AsyncIterator[bytes]:
        source = CachedStoreSource(self.store, self.backup, self.parts_dir)
        counters = StageCounters(cipher_total=source.total_size, passes=self.counters.passes + 1)
        self.counters = counters
        taps = self.make_taps()

        def on_decrypt(p: Progress) -> None:
            counters.fetched, counters.reused = source.fetched_bytes, source.reused_bytes
            counters.decrypted, counters.plain = p.bytes_done, p.output_bytes
            self.on_progress(counters)

        stream = decrypt_stream(source, self.key, digest=self.digest, progress=on_decrypt)
        seen = 0
        try:
            async for chunk in stream:
                for tap in taps:
                    tap.feed(chunk)
                start = seen
                seen += len(chunk)
                if seen <= offset:
                    continue
                piece = chunk[offset - start :] if start < offset else chunk
                counters.sent += len(piece)
                yield piece
            for tap in taps:
                tap.finish()
            counters.fetched, counters.reused = source.fetched_bytes, source.reused_bytes
            self.on_progress(counters)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
