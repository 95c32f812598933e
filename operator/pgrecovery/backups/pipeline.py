"""The decrypt pipeline: ciphertext source → AES-256-CBC → gunzip → async byte stream.

Why this module exists: this is the hot path of a recovery (a dump can be hundreds of GB) and
the one place where the backup is proven intact. The manual runbook pipes
`cat | openssl enc -d | gunzip`; we run the same three stages on two worker threads
(decrypt; inflate) connected by bounded queues, and hand the output to the event loop as an
`AsyncIterator[bytes]` that later phases pipe to a file, to SFTP or to psql.

Why threads: AES (cryptography) and inflate (ISA-L) release the GIL, so the two stages run on
two cores; asyncio only sees 512 KiB pieces, about two thousand per second at 1 GB/s.

Memory is constant: at most `queue_depth` pieces between stages (256 KiB of ciphertext, a
store's 2-8 MiB ranges are decrypted in slices; `out_chunk` of output), plus what the source
holds (1 MiB for local files, its fixed buffers for a streaming store source).

Checks, in order: the key on the first block (before any thread starts: `WrongKey` fails
fast), then while streaming the gzip data, and at the end the PKCS#7 padding and the gzip
CRC32/ISIZE trailer. The stream raises instead of ending normally if any check fails, so a
consumer that saw the iterator finish knows the whole dump is good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

from pgrecovery.backups.config import Digest, EncryptionKey
from pgrecovery.backups.decrypt import (
    BLOCK,
    HEADER_SIZE,
    CipherParams,
    StreamDecryptor,
    resolve_cipher,
)
from pgrecovery.backups.gunzip import GzipStreamDecoder
from pgrecovery.backups.progress import Progress, ProgressCallback
from pgrecovery.backups.sources import POLL, CiphertextSource, SourceCancelled
from pgrecovery.errors import BackupCorrupt

log = logging.getLogger(__name__)

# Pieces waiting between two stages. Four keeps both threads busy through short stalls
# (a page-cache miss, a GC pause).
DEFAULT_QUEUE_DEPTH = 4
# Ciphertext is decrypted in slices of at most this size, whatever the source's chunk size
# (2-8 MiB ranges from a store), so the decrypt -> inflate queue holds at most
# `queue_depth` x 256 KiB. Measured (512 MB dump, 2026-12-03): 1 MiB slices and 1 MiB output
# pieces cost 6-10 MiB more peak RSS than 256 KiB slices and 512 KiB pieces; the difference
# in speed and CPU was inside the run-to-run spread of the (shared, 2-CPU) machine.
DECRYPT_SLICE = 256 << 10
# Output pieces handed to the event loop: 512 KiB, so the hand-over queue holds 2 MiB.
OUT_PIECE = 512 << 10


class _End:
    """Marks the end of a stage's output."""


_END = _End()


@dataclass
class _State:
    """Counters written by the decrypt thread, read by the event loop (ints: GIL-atomic)."""

    cipher_done: int = 0
    part: int = 0


def _put(q: queue.Queue[object], item: object, cancel: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=POLL)
            return
        except queue.Full:
            if cancel.is_set():
                raise SourceCancelled from None


def _get(q: queue.Queue[object], cancel: threading.Event) -> object:
    while True:
        try:
            return q.get(timeout=POLL)
        except queue.Empty:
            if cancel.is_set():
                raise SourceCancelled from None


class _ToLoop:
    """Thread → event loop hand-over with a bound on items in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int) -> None:
        self._loop = loop
        self._slots = threading.Semaphore(depth)
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def put(self, item: object, cancel: threading.Event) -> None:
        while not self._slots.acquire(timeout=POLL):
            if cancel.is_set():
                raise SourceCancelled
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError as exc:  # the loop is closed: nobody is listening any more
            raise SourceCancelled from exc

    async def get(self) -> object:
        item = await self._queue.get()
        self._slots.release()
        return item


def _decrypt_worker(
    source: CiphertextSource,
    params: CipherParams,
    out: queue.Queue[object],
    cancel: threading.Event,
    state: _State,
    slice_size: int,
) -> None:
    try:
        decryptor = StreamDecryptor(params)
        skip = HEADER_SIZE  # `Salted__` + salt, already parsed by resolve_cipher
        for ordinal, chunk in source.chunks(cancel):
            state.part = ordinal
            state.cipher_done += len(chunk)
            data = memoryview(chunk)
            if skip:
                if len(data) <= skip:
                    skip -= len(data)
                    continue
                data = data[skip:]
                skip = 0
            for start in range(0, len(data), slice_size):
                plain = decryptor.update(data[start : start + slice_size])
                if plain:
                    _put(out, (ordinal, plain), cancel)
        last = source.parts[-1].name if source.parts else "the last part"
        tail = decryptor.finalize(last_part=f"the last part ({last})")
        state.part = len(source.parts)
        if tail:
            _put(out, (len(source.parts) - 1, tail), cancel)
        _put(out, _END, cancel)
    except SourceCancelled:
        return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        with contextlib.suppress(SourceCancelled):
            _put(out, exc, cancel)


def _inflate_worker(
    source: CiphertextSource,
    inp: queue.Queue[object],
    out: _ToLoop,
    cancel: threading.Event,
    out_chunk: int,
    use_isal: bool,
) -> None:
    decoder = GzipStreamDecoder(out_chunk=out_chunk, use_isal=use_isal)
    ordinal = 0
    try:
        while True:
            item = _get(inp, cancel)
            if item is _END:
                decoder.finish()
                out.put(_END, cancel)
                return
            if isinstance(item, BaseException):
                out.put(item, cancel)
                return
            ordinal, data = cast(tuple[int, bytes | memoryview], item)
            for piece in decoder.feed(data):
                out.put(piece, cancel)
    except SourceCancelled:
        return
    except BackupCorrupt as exc:
        n = len(source.parts)
        name = source.parts[ordinal].name if ordinal < n else "?"
        where = (
            f" [detected in part {name}, {ordinal + 1} of {n}; the damage is in this part "
            "or an earlier one]"
            if n > 1
            else ""
        )
        err = BackupCorrupt(f"backup {source.backup_id}: {exc}{where}")
        with contextlib.suppress(SourceCancelled):
            out.put(err, cancel)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        with contextlib.suppress(SourceCancelled):
            out.put(exc, cancel)


async def check_key(
    source: CiphertextSource, key: EncryptionKey, digest: Digest = Digest.AUTO
) -> CipherParams:
    """Read the first block of part 0 and check the key; `WrongKey` if it does not fit.

    Cheap (32 bytes), so the Fetching phase runs it before downloading anything.
    """
    head = await source.read_head(HEADER_SIZE + BLOCK)
    return resolve_cipher(head, key, digest)


async def decrypt_stream(
    source: CiphertextSource,
    key: EncryptionKey,
    *,
    digest: Digest = Digest.AUTO,
    progress: ProgressCallback | None = None,
    out_chunk: int = OUT_PIECE,
    queue_depth: int = DEFAULT_QUEUE_DEPTH,
    use_isal: bool = True,
) -> AsyncIterator[bytes]:
    """Yield the decrypted, decompressed dump of `source`, piece by piece.

    Raises `WrongKey` before the first piece if the key does not fit; `BackupCorrupt` or
    `BackupIncomplete` at the point the damage is found. Closing the iterator early stops the
    worker threads and the source.
    """
    params = await check_key(source, key, digest)
    log.info(
        "decrypting backup %s (%d parts, digest %s)",
        source.backup_id,
        len(source.parts),
        params.digest.value,
    )
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    state = _State()
    between: queue.Queue[object] = queue.Queue(maxsize=queue_depth)
    to_loop = _ToLoop(loop, queue_depth)
    threads = [
        threading.Thread(
            target=_decrypt_worker,
            args=(source, params, between, cancel, state, DECRYPT_SLICE),
            name=f"decrypt {source.backup_id}",
            daemon=True,
        ),
        threading.Thread(
            target=_inflate_worker,
            args=(source, between, to_loop, cancel, out_chunk, use_isal),
            name=f"gunzip {source.backup_id}",
            daemon=True,
        ),
    ]
    total = source.total_size
    parts_total = len(source.parts)
    produced = 0
    await source.start()
    try:
        for thread in threads:
            thread.start()
        while True:
            item = await to_loop.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            item = cast(bytes, item)
            produced += len(item)
            if progress is not None:
                progress(Progress(state.cipher_done, total, state.part, parts_total, produced))
            yield item
        if progress is not None:
            progress(Progress(total, total, parts_total, parts_total, produced))
        log.info("backup %s decrypted: %d bytes, checks passed", source.backup_id, produced)
    finally:
        cancel.set()
        await source.stop()
        for thread in threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)
