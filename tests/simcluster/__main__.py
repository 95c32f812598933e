"""`python -m tests.simcluster up|down|status`: the simulated a9s-pg cluster by hand.

For the demo and for debugging: `up` leaves the VMs running after the command returns and
prints how to reach each one; `down` removes every trace (also of a crashed run); `status`
shows each VM and the cluster's health. Needs root.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .cluster import SimCluster, SimClusterError, missing_prerequisites, teardown
from .config import ClusterConfig

CLI_NAME = "pgdemo"
CLI_SUBNET = "10.77.8"


def _config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        name=args.name,
        vms=args.vms,
        subnet=args.subnet,
        base_dir=Path(args.base_dir) if args.base_dir else None,
    )


def _print_access(cluster: SimCluster) -> None:
    print(f"deployment {cluster.config.deployment}, ssh user {cluster.ssh_user}")
    print(f"client key:  {cluster.client_key_path}")
    print(f"known_hosts: {cluster.known_hosts_path}")
    for vm in cluster.vms:
        print(f"  {vm.name} {vm.address}: {shlex.join(cluster.ssh_argv(vm))}")
    print(
        f"root shell without ssh: nsenter -t <pid1> -m -u -i -n -p (state in {cluster.state_path})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    # Not the test fixture's name and subnet: a demo cluster and a test session can coexist.
    parser.add_argument("--name", default=CLI_NAME)
    parser.add_argument("--vms", type=int, default=ClusterConfig.vms)
    parser.add_argument("--subnet", default=CLI_SUBNET)
    parser.add_argument("--base-dir", default=None)
    args = parser.parse_args(argv)
    config = _config(args)

    if args.command == "down":
        done = teardown(config, force=True)
        print("\n".join(done) if done else "nothing to remove")
        return 0

    if args.command == "status":
        try:
            cluster = SimCluster.attach(config.name, config.base_dir)
        except FileNotFoundError:
            print(f"cluster {config.name} is not up")
            return 3
        print(cluster.status_text())
        health = cluster.health()
        print("healthy" if health.ok else "NOT healthy: " + "; ".join(health.problems))
        _print_access(cluster)
        return 0 if health.ok else 1

    problems = missing_prerequisites()
    if problems:
        print("cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2
    cluster = SimCluster(config)
    started = time.monotonic()
    try:
        cluster.up(lock_wait_s=0)
    except SimClusterError as exc:
        print(f"bring-up failed: {exc}", file=sys.stderr)
        return 1
    cluster.detach()
    print(f"cluster {config.name} up and healthy in {time.monotonic() - started:.1f}s")
    print(cluster.status_text())
    _print_access(cluster)
    print(f"tear down with: python -m tests.simcluster down --name {config.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
