"""Benchmark: `pgrecovery backups decrypt` against the runbook, from a directory, S3 and Azure.

Why this script exists: the Decrypting phase promises to be several times faster than the
manual pipeline while using constant memory, wherever the backup is. This builds a realistic
backup (pg_dump-like COPY text, compressing about 3.6x like real data) with the real tools
(`gzip`, `openssl enc -aes256 -md md5 -pass file:`, `split`), puts it in a directory, in a
SeaweedFS S3 gateway (as parts) and in Azurite (as one blob, as a9s-pg writes it there), then
times, per source, the runbook and `pgrecovery backups decrypt` alternately, and prints
medians, the ratio, CPU seconds and the peak RSS of each, and checks that every output is
byte-identical to the original dump (sha256).

The runbook per source:
- dir: `cat $(ls -1v parts) | openssl enc -d -aes256 -md md5 -pass file:K | gunzip -c > out`
- s3: `aws s3 cp --recursive` of the parts into a directory, then the same pipeline
- azure: download the blob (azure-storage-blob's `download_blob(max_concurrency=4)`, what
  `az storage blob download` runs; the az CLI is not installed here), then the same pipeline

    python bench/decrypt.py                        # 1 GiB of plaintext, 5 runs, all sources
    python bench/decrypt.py --size 256M --runs 3 --source s3 --workdir /var/tmp/pgr-bench

Not a test: it takes a few minutes and uses both cores; the object-store servers run on the
same machine and take CPU from both contenders. Peak RSS and CPU seconds come from GNU time of
each run (for a shell pipeline: its largest process; CPU: all its processes, not the server's).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.objectstores.a9sbackup import make_backup, upload_s3  # noqa: E402
from tests.objectstores.dumpgen import write_dump  # noqa: E402
from tests.objectstores.servers import start_azurite, start_seaweedfs  # noqa: E402

GUID = "de2fe9e4-6535-423d-8709-dca87df7985c"
BACKUP_ID = f"{GUID}-1740130000123"
SOURCES = ("dir", "s3", "azure")

AZURE_DOWNLOAD = """
import os, sys
from azure.storage.blob import BlobClient
blob = BlobClient.from_connection_string(
    os.environ["AZURE_STORAGE_CONNECTION_STRING"], sys.argv[1], sys.argv[2])
with open(sys.argv[3], "wb") as f:
    blob.download_blob(max_concurrency=4).readinto(f)
"""


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


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # user + system seconds of the command and its children
    rss_kib: int  # peak RSS of its largest process


def timed(argv: list[str], env: dict[str, str]) -> Run:
    """Run `argv` under GNU time (`wait4()` on a child forked from this Python process would
    count the parent's pages the child shares until it execs)."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time is None:
        raise SystemExit("GNU time (/usr/bin/time) is needed for the peak RSS")
    with tempfile.NamedTemporaryFile("r") as report:
        wrapped = [gnu_time, "-f", "%M %U %S", "-o", report.name, *argv]
        start = time.perf_counter()
        proc = subprocess.run(
            wrapped, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise SystemExit(f"{shlex.join(argv)[:200]}... exited {proc.returncode}\n{tail}")
        rss, user, system = report.read().split()[-3:]
    return Run(elapsed, float(user) + float(system), int(rss))


@dataclass
class Contest:
    """One source: the runbook's commands and pgrecovery's, with their results."""

    source: str
    manual: list[str]
    ours: list[str]
    env: dict[str, str]
    before_manual: list[Path] = field(default_factory=list)  # removed before each manual run
    results: dict[str, list[Run]] = field(default_factory=lambda: {"manual": [], "pgrecovery": []})
    same: bool = False


def pipeline(parts_dir: Path, key_file: Path, out: Path) -> str:
    return (
        f"cd {parts_dir} && cat $(ls -1v {BACKUP_ID}-* {BACKUP_ID} 2>/dev/null) | "
        f"openssl enc -d -aes256 -md md5 -pass file:{key_file} | gunzip -c > {out}"
    )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgrecovery.cli", "backups", "decrypt", *args, "--no-progress"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="plaintext dump size (default 1G)")
    parser.add_argument("--part-size", default="256M", help="split -b size (default 256M)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument(
        "--sources",
        "--source",
        default=",".join(SOURCES),
        help="comma-separated: dir,s3,azure (default: all three)",
    )
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size, part_size = parse_size(args.size), parse_size(args.part_size)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := set(sources) - set(SOURCES):
        parser.error(f"unknown source(s): {', '.join(sorted(unknown))}")

    work = Path(tempfile.mkdtemp(prefix="pgr-bench-", dir=args.workdir))
    stops = []
    try:
        plain = work / "dump.sql"
        key_file = work / "key"
        key_file.write_bytes(os.urandom(24).hex().encode() + b"\n")
        key_file.chmod(0o600)

        t = time.perf_counter()
        plain_size = write_dump(plain, size, seed=42)
        print(f"dump: {plain_size / 1e6:.0f} MB of pg_dump text ({time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        parts = work / "parts"
        backup = make_backup(plain, parts, BACKUP_ID, key_file, part_size=part_size)
        enc_size = sum(p.stat().st_size for p in backup.files)
        print(
            f"backup: gzip | openssl enc -aes256 -md md5 | split -> {len(backup.files)} parts, "
            f"{enc_size / 1e6:.0f} MB (ratio {plain_size / enc_size:.2f}x, "
            f"{time.perf_counter() - t:.1f}s)"
        )
        expected = sha256_file(plain)
        plain.unlink()  # keep the page cache for the contenders, not the original

        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
        base_env["PYTHONWARNINGS"] = "ignore"
        key = ["--key-file", str(key_file)]
        contests: list[Contest] = []
        for source in sources:
            out_m, out_o = work / f"manual-{source}.dump", work / f"pgrecovery-{source}.dump"
            if source == "dir":
                contests.append(
                    Contest(
                        source,
                        ["bash", "-o", "pipefail", "-c", pipeline(parts, key_file, out_m)],
                        cli("--from-dir", str(parts), "--backup-id", BACKUP_ID, *key, "-o",
                            str(out_o)),
                        base_env,
                    )
                )  # fmt: skip
            elif source == "s3":
                t = time.perf_counter()
                s3 = start_seaweedfs(work)
                stops.append(s3.stop)
                bucket = s3.new_bucket("bench")
                upload_s3(s3.client(), bucket, backup)
                print(f"s3: SeaweedFS {s3.endpoint_url}, uploaded ({time.perf_counter() - t:.1f}s)")
                dl = work / "s3-download"
                script = (
                    f"aws s3 cp --recursive --quiet --exclude '*' --include '{BACKUP_ID}-*' "
                    f"s3://{bucket}/ {dl}/ && " + pipeline(dl, key_file, out_m)
                )
                contests.append(
                    Contest(
                        source,
                        ["bash", "-o", "pipefail", "-c", script],
                        cli("--s3-bucket", bucket, "--backup-id", BACKUP_ID, *key, "-o",
                            str(out_o)),
                        base_env | s3.env(),
                        [dl],
                    )
                )  # fmt: skip
            else:
                t = time.perf_counter()
                azure = start_azurite(work)
                stops.append(azure.stop)
                container = azure.new_container("bench")
                client = azure.service().get_container_client(container)
                whole = work / BACKUP_ID
                subprocess.run(
                    ["bash", "-c", f"cat $(ls -1v {' '.join(map(str, backup.files))}) > {whole}"],
                    check=True,
                )
                with whole.open("rb") as f:  # a9s-pg on Azure: one blob <backup-id>
                    client.upload_blob(BACKUP_ID, f, overwrite=True, max_concurrency=4)
                whole.unlink()
                print(
                    f"azure: Azurite port {azure.port}, uploaded ({time.perf_counter() - t:.1f}s)"
                )
                dl = work / "azure-download"
                script = (
                    f"mkdir -p {dl} && {shlex.quote(sys.executable)} -c "
                    f"{shlex.quote(AZURE_DOWNLOAD)} {container} {BACKUP_ID} {dl / BACKUP_ID} && "
                    + pipeline(dl, key_file, out_m)
                )
                contests.append(
                    Contest(
                        source,
                        ["bash", "-o", "pipefail", "-c", script],
                        cli("--azure-container", container, "--backup-id", BACKUP_ID, *key,
                            "-o", str(out_o)),
                        base_env | azure.env(),
                        [dl],
                    )
                )  # fmt: skip

        # One untimed warm-up of each, then alternate so both see the same machine state.
        for round_ in range(args.runs + 1):
            for c in contests:
                for name, argv in (("manual", c.manual), ("pgrecovery", c.ours)):
                    for path in (work / f"{name}-{c.source}.dump", *c.before_manual):
                        shutil.rmtree(path, ignore_errors=True)
                        path.unlink(missing_ok=True)
                    measured = timed(argv, c.env)
                    if round_:
                        c.results[name].append(measured)
                        print(
                            f"  run {round_} {c.source:<5} {name:<10} {measured.wall:6.2f}s "
                            f"{measured.cpu:6.2f} CPU-s {measured.rss_kib / 1024:5.0f} MiB",
                            flush=True,
                        )
            if round_ == 0:
                for c in contests:
                    m, o = work / f"manual-{c.source}.dump", work / f"pgrecovery-{c.source}.dump"
                    c.same = sha256_file(m) == sha256_file(o) == expected

        print(f"\n{plain_size / 1e6:.0f} MB dump, {len(backup.files)} parts, {args.runs} runs")
        print(
            f"{'source':<7}{'method':<12}{'median s':>9}{'min-max s':>12}{'MB/s':>6}"
            f"{'CPU-s':>7}{'peak RSS':>10}{'ratio':>7}  identical"
        )
        ok = True
        for c in contests:
            med = {}
            for name, runs in c.results.items():
                walls = [r.wall for r in runs]
                med[name] = statistics.median(walls)
                rss = max(r.rss_kib for r in runs) / 1024
                cpu = statistics.median(r.cpu for r in runs)
                ratio = f"{med['manual'] / med[name]:.2f}x" if name == "pgrecovery" else ""
                print(
                    f"{c.source:<7}{name:<12}{med[name]:>9.2f}"
                    f"{f'{min(walls):.2f}-{max(walls):.2f}':>12}"
                    f"{plain_size / med[name] / 1e6:>6.0f}{cpu:>7.2f}{rss:>6.0f} MiB{ratio:>7}"
                    f"  {('yes' if c.same else 'NO') if name == 'pgrecovery' else ''}"
                )
            ok = ok and c.same
        if "dir" in sources:
            dir_runs = contests[sources.index("dir")].results["pgrecovery"]
            base = statistics.median(r.wall for r in dir_runs)
            for c in contests:
                if c.source != "dir":
                    mine = statistics.median(r.wall for r in c.results["pgrecovery"])
                    print(f"pgrecovery from {c.source} vs from dir: {mine / base:.2f}x the time")
        print(f"outputs identical to the original dump (sha256): {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        for stop in stops:
            stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
