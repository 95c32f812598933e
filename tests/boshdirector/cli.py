"""Where `.ci/build-bosh.sh` put the real bosh CLI (same cache key as the script), and running
it against the emulator with the environment `bosh` itself reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = Path(os.environ.get("PGRECOVERY_BOSH_CACHE", "/var/cache/pgrecovery-bosh"))
MODULE = "github.com/cloudfoundry/bosh-cli/v7"


def _pinned_version() -> str:
    for line in (REPO / ".ci/bosh/go.mod").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == MODULE and words[1].startswith("v"):
            return words[1]
    raise RuntimeError(f"no {MODULE} in .ci/bosh/go.mod")


def bosh_binary() -> Path:
    """The binary for the pin in the repo (it may not exist yet: see `build`)."""
    pin = b"".join(
        (REPO / p).read_bytes() for p in (".ci/bosh/go.mod", ".ci/bosh/go.sum", ".ci/build-bosh.sh")
    )
    key = f"bosh-cli-{_pinned_version()}-{hashlib.sha256(pin).hexdigest()[:12]}"
    return CACHE_ROOT / key / "bin" / "bosh"


def build() -> tuple[Path | None, str]:
    """Build (or find cached) the bosh CLI; (binary or None, the script's output)."""
    proc = subprocess.run(
        ["bash", str(REPO / ".ci/build-bosh.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    binary = bosh_binary()
    return (binary if proc.returncode == 0 and binary.is_file() else None), (
        proc.stdout + proc.stderr
    ).strip()
