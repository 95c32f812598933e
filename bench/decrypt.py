"""Benchmark: `pgrecovery backups decrypt` against the runbook's `cat | openssl | gunzip`.

Why this script exists: the Decrypting phase promises to be several times faster than the
manual pipeline while using constant memory. This builds a realistic backup (pg_dump-like
COPY text, compressing about 3.6x like real data) with the real tools (`gzip`,
`openssl enc -aes256 -md md5 -pass file:`, `split`), then times both ways alternately, prints
medians, the throughput ratio and the peak RSS of each, and checks that both outputs are
byte-identical to the original dump (sha256).

    python bench/decrypt.py                  # 1 GiB of plaintext, 5 runs each
    python bench/decrypt.py --size 256M --runs 3 --workdir /var/tmp/pgr-bench

Not a test: it takes a minute or two and uses both cores. Peak RSS comes from GNU time of
each run (for the shell pipeline: its largest process).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.objectstores.a9sbackup import make_backup  # noqa: E402
from tests.objectstores.dumpgen import write_dump  # noqa: E402

GUID = "de2fe9e4-6535-423d-8709-dca87df7985c"
BACKUP_ID = f"{GUID}-1740130000123"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `argv`; return (wall seconds, peak RSS in KiB of it or its largest child).

    The RSS comes from GNU time when present: `wait4()` on a child forked from this Python
    process would count the parent's pages the child shares until it execs.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile("r") as report:
        wrapped = [gnu_time, "-f", "%M", "-o", report.name, *argv] if gnu_time else argv
        start = time.perf_counter()
        proc = subprocess.Popen(
            wrapped, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{argv[:3]}... exited {code}")
        rss = int(report.read().split()[-1]) if gnu_time else usage.ru_maxrss
    return elapsed, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="plaintext dump size (default 1G)")
    parser.add_argument("--part-size", default="256M", help="split -b size (default 256M)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size, part_size = parse_size(args.size), parse_size(args.part_size)

    work = Path(tempfile.mkdtemp(prefix="pgr-bench-", dir=args.workdir))
    try:
        plain = work / "dump.sql"
        key_file = work / "key"
        key_file.write_bytes(os.urandom(24).hex().encode() + b"\n")
        key_file.chmod(0o600)

        t = time.perf_counter()
        plain_size = write_dump(plain, size, seed=42)
        print(f"dump: {plain_size / 1e6:.0f} MB of pg_dump text ({time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        backup = make_backup(plain, work / "parts", BACKUP_ID, key_file, part_size=part_size)
        enc_size = sum(p.stat().st_size for p in backup.files)
        print(
            f"backup: gzip | openssl enc -aes256 -md md5 | split -> {len(backup.files)} parts, "
            f"{enc_size / 1e6:.0f} MB (ratio {plain_size / enc_size:.2f}x, "
            f"{time.perf_counter() - t:.1f}s)"
        )
        expected = sha256_file(plain)
        plain.unlink()  # keep the page cache for the two contenders, not the original

        out_manual, out_ours = work / "manual.dump", work / "pgrecovery.dump"
        manual = [
            "bash", "-o", "pipefail", "-c",
            f"cd {work / 'parts'} && cat $(ls -1v {BACKUP_ID}-*) | "
            f"openssl enc -d -aes256 -md md5 -pass file:{key_file} | "
            f"gunzip -c > {out_manual}",
        ]  # fmt: skip
        ours = [
            sys.executable, "-m", "pgrecovery.cli", "backups", "decrypt",
            "--from-dir", str(work / "parts"), "--backup-id", BACKUP_ID,
            "--key-file", str(key_file), "-o", str(out_ours), "--no-progress",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}

        results: dict[str, list[tuple[float, int]]] = {"manual": [], "pgrecovery": []}
        # One untimed warm-up of each, then alternate so both see the same machine state.
        for round_ in range(args.runs + 1):
            for name, argv, out in (("manual", manual, out_manual), ("pgrecovery", ours, out_ours)):
                out.unlink(missing_ok=True)
                measured = timed(argv, env)
                if round_:
                    results[name].append(measured)
                    print(f"  run {round_} {name:<10} {measured[0]:6.2f}s", flush=True)

        same = sha256_file(out_manual) == sha256_file(out_ours) == expected
        print()
        print(f"{'':<12}{'median s':>10}{'min s':>8}{'MB/s':>9}{'peak RSS':>11}")
        medians = {}
        for name, runs in results.items():
            walls = [w for w, _ in runs]
            medians[name] = statistics.median(walls)
            rss = max(r for _, r in runs) / 1024
            print(
                f"{name:<12}{medians[name]:>10.2f}{min(walls):>8.2f}"
                f"{plain_size / medians[name] / 1e6:>9.0f}{rss:>8.0f} MiB"
            )
        print(
            f"\nthroughput ratio (pgrecovery / manual, medians): "
            f"{medians['manual'] / medians['pgrecovery']:.2f}x"
        )
        print(f"outputs identical to the original dump (sha256): {'yes' if same else 'NO'}")
        return 0 if same else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
