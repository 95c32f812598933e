"""Bring-up time and reliability of the simulated a9s-pg cluster (tests/simcluster).

Runs N up/down cycles of a full cluster (boot, pre-start, clone, monit, until `repmgr cluster
show` and `pg_stat_replication` say healthy), prints each cycle's bring-up and teardown time,
the median bring-up, and the failures; after every teardown it checks that nothing is left
on the host. A benchmark, not a timed test: timings on a shared 2-core machine vary with load.

    python bench/simcluster_cycles.py [--cycles 10] [--vms 3]

Needs root. Uses its own cluster name and subnet so it never disturbs a test session.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.simcluster import ClusterConfig, SimCluster, host, missing_prerequisites


def leftovers(config: ClusterConfig) -> list[str]:
    found = []
    if ns := host.list_netns(f"{config.name}-"):
        found.append(f"netns {ns}")
    if mounts := host.mounts_under(config.root):
        found.append(f"mounts {mounts}")
    if pids := host.pids_mentioning(str(config.root) + "/"):
        found.append(f"processes {pids}")
    if host.link_exists(config.bridge):
        found.append(f"bridge {config.bridge}")
    if config.root.exists():
        found.append(f"directory {config.root}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--name", default="pgbench")
    parser.add_argument("--subnet", default="10.77.3")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    problems = missing_prerequisites()
    if problems:
        print("cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2
    config = ClusterConfig(name=args.name, vms=args.vms, subnet=args.subnet)
    ups: list[float] = []
    failures: list[str] = []
    for cycle in range(1, args.cycles + 1):
        cluster = SimCluster(config)
        started = time.monotonic()
        try:
            cluster.up(timeout=args.timeout)
            up_s = time.monotonic() - started
            ups.append(up_s)
            outcome = "healthy"
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            up_s = time.monotonic() - started
            outcome = "FAILED"
            failures.append(f"cycle {cycle}: {exc}")
            traceback.print_exc()
        down_started = time.monotonic()
        cluster.down()
        down_s = time.monotonic() - down_started
        left = leftovers(config)
        if left:
            failures.append(f"cycle {cycle}: leftovers after down: {left}")
        print(
            f"cycle {cycle:2}: bring-up {up_s:5.2f}s {outcome}, teardown {down_s:4.2f}s"
            + (f", LEFTOVERS {left}" if left else ""),
            flush=True,
        )

    if ups:
        print(
            f"bring-up of {args.vms} VMs over {len(ups)} successful cycles: "
            f"median {statistics.median(ups):.2f}s, min {min(ups):.2f}s, max {max(ups):.2f}s"
        )
    print(f"failures: {len(failures)} of {args.cycles}")
    for failure in failures:
        print("  " + failure.splitlines()[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
