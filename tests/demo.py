"""The demo: a whole recovery, end to end, on the embedded default world.

Why this module exists: `pgrecovery demo` must show the product to someone who just cloned the
repository — on one machine, with nothing but the README's set-up. It brings up the simulated
3-VM a9s-pg cluster and an S3 server, writes sample data, takes a backup exactly the runbook's
way (pg_dumpall | gzip | openssl enc -aes256 -md md5 | split), damages the data, applies a
PgRecovery with the real `kubectl` to the real operator (a `kopf run` subprocess) against the
Kubernetes API emulator — reaching the VMs the BOSH way, through a BOSH director (the emulator
of tests/boshdirector: no addresses, no SSH key in the manifest) — shows phases and progress
live, verifies the data on every node and that no ephemeral user is left on the VMs, prints how
long each phase took, and cleans everything up. It lives with the test world it drives; the
CLI imports it from a source checkout.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO, cast

import yaml

from tests.boshdirector.director import Client, DirectorEmulator
from tests.boshdirector.recovery import bosh_recovery_objects, ephemeral_users_left
from tests.kubeapi.harness import KopfProcess, KubeAPI, Kubectl
from tests.kubeapi.server import EmulatorThread
from tests.objectstores.servers import start_moto
from tests.scenario import Scenario
from tests.simcluster.cluster import SimCluster, SimClusterError, missing_prerequisites
from tests.simcluster.config import ClusterConfig
from tests.simcluster.data import table_checksums

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "pgrecovery"
NAME = "demo-recovery"
# Its own cluster name and subnet, so the demo can run beside a test session.
DEMO_CLUSTER = ClusterConfig(name="pgdemo", subnet="10.77.8")
TIMEOUT = 900.0


def _say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _follow(kubectl: Kubectl, operator: KopfProcess, out: TextIO) -> dict[str, object]:
    """Print phase changes, step transitions and progress until the recovery ends."""
    seen_steps: dict[str, str] = {}
    last_phase = last_progress = ""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = kubectl("get", "pgr", NAME, "-n", NAMESPACE, "-o", "json")
        status = json.loads(result.stdout).get("status", {}) if result.returncode == 0 else {}
        phase = str(status.get("phase", ""))
        for step in status.get("steps", []):
            key = f"{step['phase']}/{step['name']}"
            if seen_steps.get(key) != step["state"]:
                seen_steps[key] = step["state"]
                # Under the phase the step belongs to (status is read once a second: a step of
                # the next phase can already be there when the phase changes).
                if step["phase"] != last_phase:
                    last_phase = step["phase"]
                    _say(out, f"\n== phase {last_phase}")
                mark = {"Running": "→", "Succeeded": "✓", "Failed": "✗"}.get(step["state"], "·")
                message = f"  ({step['message']})" if step.get("message") else ""
                _say(out, f"   {mark} {step['name']}{message[:140]}")
        progress = status.get("progress", {})
        if progress.get("detail") and progress.get("detail") != last_progress:
            last_progress = progress["detail"]
            _say(out, f"     {progress.get('percent', '?')}% {last_progress}")
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        if conditions.get("Succeeded", {}).get("status") == "True" or phase == "Failed":
            return status
        if not operator.running:
            raise RuntimeError("the operator exited:\n" + operator.log_text()[-3000:])
        time.sleep(1)
    raise TimeoutError(f"the recovery did not finish within {TIMEOUT:.0f} s")


class _Recorder(io.TextIOBase):
    """Everything the demo shows, kept for the secrets audit at the end."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.text = out, io.StringIO()

    def write(self, text: str) -> int:
        self.text.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def _secrets_audit(
    scenario: Scenario, texts: dict[str, str], extra: list[str] | None = None
) -> list[str]:
    """Where a secret value of the recovery (key, SSH key, store credentials, the director
    client's secret) appears."""
    values = [*scenario.secret_strings(), *(extra or [])]
    return [where for where, text in texts.items() if any(secret in text for secret in values)]


def run_demo(out: TextIO = sys.stdout) -> int:
    recorder = _Recorder(out)
    return _run_demo(cast(TextIO, recorder), recorder)


def _run_demo(out: TextIO, recorder: _Recorder) -> int:
    # The in-process S3 server logs every request at INFO; the demo shows the recovery instead.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    problems = missing_prerequisites()
    if problems:
        _say(out, "the demo needs: " + "; ".join(problems) + " (run `bash .ci/setup` as root)")
        return 2
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgr-demo-")))
        _say(out, "== starting an S3 server (moto) and the simulated a9s-pg cluster (3 VMs)")
        s3 = start_moto()
        stack.callback(s3.stop)
        cluster = SimCluster(DEMO_CLUSTER)
        stack.callback(cluster.down)
        cluster.up()
        _say(out, f"   cluster up: {', '.join(f'{vm.name}={vm.address}' for vm in cluster.vms)}")
        # The way real users reach BOSH VMs: the director lists them and opens ephemeral users.
        director = stack.enter_context(
            DirectorEmulator(
                {cluster.config.deployment: cluster.vms},
                clients={"pgrecovery": Client(secrets.token_urlsafe(16))},
            )
        )
        _say(out, f"== BOSH director (emulated) at {director.url}, UAA client 'pgrecovery'")

        _say(out, "== writing sample data, taking a backup the runbook's way, then damaging data")
        scenario = Scenario.prepare(cluster, s3, rows=2000, part_size=256 * 1024)
        _say(
            out,
            f"   backup {scenario.backup.backup_id}: {len(scenario.backup.parts)} "
            f"encrypted parts, {scenario.backup.ciphertext_size} bytes "
            f"(dump {scenario.backup.plain_size} bytes)",
        )
        _say(out, "   damage: 37 rows rewritten in 'shop', table crm.public.orders dropped")

        _say(out, "== starting the Kubernetes API emulator and the operator (kopf run)")
        server = stack.enter_context(EmulatorThread())
        api = KubeAPI(server=server, kubeconfig=Path(), directory=workdir / "kube")
        api.kubeconfig = api.user_kubeconfig("admin")
        api.create_namespace(NAMESPACE)
        api.install_crd(ROOT / "crds" / "pgrecovery.yaml")
        kubectl = Kubectl(kubeconfig=api.kubeconfig, cache_dir=workdir / "kubectl-cache")
        operator = KopfProcess(
            api,
            "pgrecovery.main",
            namespace=NAMESPACE,
            user="pgrecovery-operator",
            log_path=workdir / "operator.log",
            watching=("pgrecoveries",),
            env={
                "PGRECOVERY_WORK_DIR": str(workdir / "work"),
                "PGRECOVERY_METRICS_PORT": str(_free_port()),
                "PGRECOVERY_POLL_INTERVAL": "1",
            },
        )
        stack.callback(operator.stop)
        operator.start()

        manifest = yaml.safe_dump_all(
            bosh_recovery_objects(scenario, director, NAME, NAMESPACE, "pgrecovery")
        )
        _say(out, "== kubectl apply -f pgrecovery.yaml (Secrets + PgRecovery with target.bosh)")
        applied = kubectl.apply(manifest)
        _say(out, "   " + applied.stdout.strip().replace("\n", "\n   "))
        status = _follow(kubectl, operator, out)

        _say(out, "\n== kubectl get pgr")
        _say(out, kubectl("get", "pgr", "-n", NAMESPACE).stdout.rstrip())
        if status.get("phase") == "Failed":
            _say(out, f"\nRECOVERY FAILED: {status.get('failureReason')}: {status.get('message')}")
            return 1

        _say(out, "\n== verification (each node against the backup)")
        checks = scenario.restored_everywhere()
        primary_tables = table_checksums(cluster.primary())
        for table, digest in sorted(scenario.expected.items()):
            got = primary_tables.get(table)
            _say(
                out,
                f"   {table:<32} rows expected {digest.rows:>6}  restored "
                f"{got.rows if got else 'missing':>6}",
            )
        for node, ok in checks.items():
            _say(out, f"   {node}: {'data equal to the backup' if ok else 'DIFFERENT'}")
        proof = status.get("restoreProof") or {}
        assert isinstance(proof, dict)
        _say(
            out,
            f"   operator's restore proof: {proof.get('rows', 0)} rows in "
            f"{proof.get('tables', 0)} tables of {proof.get('databases', 0)} databases counted "
            f"against the dump on {len(proof.get('verifiedOn', []))} of "
            f"{proof.get('nodes', 0)} nodes ({', '.join(proof.get('verifiedOn', []))})",
        )
        for line in proof.get("notVerified", []):
            _say(out, f"     not verified: {line[:150]}")
        try:
            # The stand-in BOSH agent reports every 3 s: give it one heartbeat to catch up.
            health = cluster.wait_healthy(timeout=30)
        except SimClusterError:
            health = cluster.health()
        _say(
            out,
            f"   cluster healthy: {health.ok} (primary {health.primary}"
            f"{'; ' + '; '.join(health.problems) if health.problems else ''})",
        )
        events = kubectl("get", "events", "-n", NAMESPACE, "-o", "json").stdout
        pgr = kubectl("get", "pgr", NAME, "-n", NAMESPACE, "-o", "yaml").stdout
        left = ephemeral_users_left(director, cluster.config.deployment)
        users_ok = not any(left.values())
        tasks = [t.description for t in director._tasks.values()]
        _say(
            out,
            f"   director: {tasks.count('ssh: setup')} ssh setups, "
            f"{tasks.count('ssh: cleanup')} cleanups; ephemeral users left on the VMs: "
            + ("none" if users_ok else str(left)),
        )
        director_secret = [director.clients["pgrecovery"].secret]
        leaks = _secrets_audit(scenario, {
            "demo output": recorder.text.getvalue(), "status": pgr, "events": events,
            "operator log": operator.log_text(),
        }, director_secret)
        count = len(scenario.secret_strings()) + len(director_secret)
        _say(out, "   secrets: " + (
            f"none of the {count} secret values appears in the demo output, the status, the "
            "events or the operator log" if not leaks else f"LEAKED into {', '.join(leaks)}"
        ))
        _say(out, "\n== time per phase")
        durations = status.get("phaseDurations", {})
        assert isinstance(durations, dict)
        for phase in ("Fetching", "Decrypting", "Staging", "Restoring", "Rejoined"):
            if phase in durations:
                _say(out, f"   {phase:<11} {float(durations[phase]):6.1f} s")
        # Where the rest of the demo's time went: the phases add up to the recovery only.
        in_phases = sum(float(v) for v in durations.values())
        recovery = _seconds_between(status.get("startedAt"), status.get("completedAt"))
        whole = time.monotonic() - started
        _say(out, f"   {'recovery':<11} {recovery if recovery is not None else in_phases:6.1f} s "
                  f"(phases {in_phases:.1f} s; the rest is the operator's hand-over between "
                  "them)")
        _say(out, f"   {'demo world':<11} {whole - (recovery or in_phases):6.1f} s (cluster, S3, "
                  "director and API up, sample data, backup, damage, verification)")
        ok = all(checks.values()) and health.ok and not leaks and users_ok
        _say(
            out,
            f"\n{'DEMO OK' if ok else 'DEMO FAILED'}: recovery {status.get('phase')}, "
            f"whole demo {time.monotonic() - started:.0f} s (cleaning up now)",
        )
        return 0 if ok else 1
    return 1  # pragma: no cover - the with-block always returns


def _seconds_between(start: object, end: object) -> float | None:
    """Seconds between two RFC 3339 times of the status (None when one is missing)."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(run_demo())
