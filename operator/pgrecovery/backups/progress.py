"""Progress reports shared by download and decryption.

Why this module exists: the engine turns these into `status.progress` and `lastProgressAt`,
the CLI into a progress bar; both need the same four numbers whatever the work is.
Callbacks run on the event loop thread and must be cheap (they are called per chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Progress:
    bytes_done: int
    """Encrypted bytes fetched (download) or consumed (decryption)."""
    bytes_total: int
    parts_done: int
    parts_total: int
    output_bytes: int = 0
    """Decrypted, decompressed bytes produced so far (decryption only)."""

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


ProgressCallback = Callable[[Progress], None]


def human_size(n: float) -> str:
    """`1.5 GiB` style sizes for people (binary units, as `ls -h` and `df -h`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
