"""The operator's machinery end to end: a real `kopf run -m pgrecovery.main` against the real
kube-apiserver (tests/realkube; each test in its own namespace), driven by the real kubectl,
with the test-only plan (tests/e2e/plan_for_tests.py).

Proves (Foundation issue): Pending → each phase → Rejoined with status, conditions and one Event
per phase; a status change from one phase fires the next phase's handler; SIGKILL mid-phase and
restart resumes that phase; a fatal error lands as Failed with its reason; an invalid spec never
reaches the first phase; deletion of a running recovery stops it and releases the finalizer;
`kubectl get pgr` shows the printer columns; `kubectl wait --for=condition=…` works for success
and failure; confirm gating, dry run, and frozen spec. The operator runs under the Helm chart's
ServiceAccount token and Role (RBAC enforced by the server).
"""

from __future__ import annotations

import copy
import datetime
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.operator_harness import install_chart
from tests.kubeapi.harness import KopfProcess, Kubectl, wait_for
from tests.realkube.server import RealKubeAPI

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "pgrecovery.yaml"
NAMESPACE = "pgrecovery"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manifest(name: str, *, deployment: str = "a9s-pg", namespace: str = NAMESPACE,
             **spec_changes: Any) -> str:
    doc = yaml.safe_load((ROOT / "manifests/samples/pgrecovery-s3.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["target"]["deployment"] = deployment
    doc["spec"]["confirm"] = deployment
    doc["spec"].update(spec_changes)
    return yaml.safe_dump(doc)


class World:
    def __init__(self, api: RealKubeAPI, kubectl: Kubectl, operator: KopfProcess, work: Path,
                 namespace: str):
        self.api, self.kubectl, self.operator, self.work = api, kubectl, operator, work
        self.namespace = namespace

    def manifest(self, name: str, **changes: Any) -> str:
        return manifest(name, namespace=self.namespace, **changes)

    def status(self, name: str) -> dict[str, Any]:
        obj = self.kubectl.json("pgr", name, "-n", self.namespace)
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.status(name).get("conditions", [])}

    def applies(self, name: str) -> list[str]:
        path = self.work / self.namespace / name / "applies.log"
        return path.read_text().split() if path.exists() else []

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.kubectl.json("events", "-n", self.namespace)["items"]
        return [e for e in items if e["involvedObject"]["name"] == name]

    def wait_condition(self, name: str, condition: str, timeout: int = 90) -> None:
        result = self.kubectl.wait(
            f"pgr/{name}", "-n", self.namespace, f"--for=condition={condition}",
            f"--timeout={timeout}s",
        )
        assert result.returncode == 0, (
            f"{condition} not reached: {result.stderr}\nstatus: {self.status(name)}\n"
            f"operator log tail:\n{self.operator.log_text()[-3000:]}"
        )


@pytest.fixture
def world(
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    real_namespace: str,
    tmp_path: Path,
) -> World:
    real_kube_api.install_crd(CRD)
    _, kubeconfig, user = install_chart(real_kube_api, real_kubectl, real_namespace)
    work = tmp_path / "work"
    operator = real_kopf_operator(
        "pgrecovery.main",
        kubeconfig=kubeconfig,
        user=user,
        env={
            "PGRECOVERY_PLAN_FACTORY": "tests.e2e.plan_for_tests:build_plan",
            "PGRECOVERY_WORK_DIR": str(work),
            "PGRECOVERY_METRICS_PORT": str(_free_port()),
            "PGRECOVERY_POLL_INTERVAL": "0.5",
            "PGRECOVERY_GATE_RECHECK": "0.5",
            "PGRECOVERY_TEST_STEP_SECONDS": "0.2",
            "PGRECOVERY_TEST_SLOW_SECONDS": "6",
        },
        watching=("pgrecoveries",),
    )
    return World(real_kube_api, real_kubectl, operator, work, real_namespace)


def test_recovery_walks_every_phase_to_rejoined(world: World) -> None:
    assert world.kubectl.apply(world.manifest("walk")).returncode == 0
    world.wait_condition("walk", "Succeeded")
    status = world.status("walk")
    assert status["phase"] == "Rejoined"
    assert status["observedGeneration"] == 1
    assert [s["state"] for s in status["steps"]] == ["Succeeded"] * 10
    assert [s["phase"] for s in status["steps"][::2]] == [
        "Fetching",
        "Decrypting",
        "Staging",
        "Restoring",
        "Rejoined",
    ]
    conditions = world.conditions("walk")
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False"
    assert conditions["Progressing"]["status"] == "False"
    assert set(status["phaseDurations"]) == {
        "Fetching",
        "Decrypting",
        "Staging",
        "Restoring",
        "Rejoined",
    }
    reasons = [e["reason"] for e in world.events("walk")]
    for phase in ("Fetching", "Decrypting", "Staging", "Restoring", "Rejoined"):
        assert reasons.count(f"Phase{phase}") == 1, reasons
    assert reasons.count("StepStarted") == 10
    assert reasons.count("StepFinished") == 10
    assert reasons.count("Succeeded") == 1
    # the printer columns, through kubectl's Table request
    table = world.kubectl.get("pgr", "-n", world.namespace)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "BACKUP", "PROGRESS", "PRIMARY", "AGE"]
    assert "Rejoined" in table.stdout.splitlines()[1]
    # re-applying the same manifest after success runs nothing again
    before = world.applies("walk")
    assert world.kubectl.apply(world.manifest("walk")).returncode == 0
    wait_for(lambda: True, timeout=2)
    assert world.applies("walk") == before


def test_sigkill_mid_phase_resumes_that_phase(world: World) -> None:
    assert world.kubectl.apply(world.manifest("crash", deployment="slow-decrypt")).returncode == 0
    wait_for(
        lambda: "decrypting-2" in world.applies("crash") or None,
        timeout=60,
        message="the slow Decrypting step to start",
    )
    world.operator.kill()
    assert world.status("crash")["phase"] == "Decrypting"
    world.operator.start()
    world.wait_condition("crash", "Succeeded", timeout=120)
    applies = world.applies("crash")
    assert applies.count("decrypting-2") == 2  # interrupted, then redone after the restart
    assert applies.count("fetching-1") == 1  # finished work is not repeated
    assert applies.count("decrypting-1") == 1
    assert world.status("crash")["phase"] == "Rejoined"


def test_fatal_error_lands_as_failed_with_reason(world: World) -> None:
    fatal = world.manifest("fatal", deployment="fail-in-staging")
    assert world.kubectl.apply(fatal).returncode == 0
    world.wait_condition("fatal", "Failed")
    status = world.status("fatal")
    assert status["phase"] == "Failed"
    assert status["failureReason"] == "Injected"
    assert "injected failure" in status["message"]
    assert status["facts"]["failedInPhase"] == "Staging"
    steps = {s["name"]: s["state"] for s in status["steps"]}
    assert steps["staging-1"] == "Failed"
    assert not any(name.startswith("restoring") for name in steps)
    assert any(
        e["reason"] == "StepFailed" and e["type"] == "Warning" for e in world.events("fatal")
    )
    # a failed recovery never runs again
    fatal = world.manifest("fatal", deployment="fail-in-staging")
    assert world.kubectl.apply(fatal).returncode == 0
    assert world.applies("fatal").count("staging-1") == 1


def test_invalid_spec_never_reaches_the_first_phase(world: World) -> None:
    doc = yaml.safe_load(world.manifest("invalid"))
    doc["spec"]["target"]["nodes"][0]["address"] = "10.0.0.1; rm -rf /"
    # The API server rejects it at apply time, and the user reads why in kubectl's output; the
    # operator's typed model (the second wall, for a server without the CRD's schema) is
    # tested on the same values in tests/unit/test_crd.py.
    result = world.kubectl.apply(yaml.safe_dump(doc))
    assert result.returncode != 0
    assert 'The PgRecovery "invalid" is invalid' in result.stderr, result.stderr
    assert "spec.target.nodes[0].address: Invalid value" in result.stderr, result.stderr
    assert "should match" in result.stderr, result.stderr
    assert world.kubectl.get("pgr", "invalid", "-n", world.namespace).returncode != 0
    assert world.applies("invalid") == []


def test_destructive_phases_wait_for_confirm(world: World) -> None:
    assert world.kubectl.apply(world.manifest("confirm", confirm="")).returncode == 0
    wait_for(
        lambda: world.conditions("confirm").get("Blocked", {}).get("status") == "True" or None,
        timeout=60,
        message="Blocked condition",
    )
    blocked = world.conditions("confirm")["Blocked"]
    assert blocked["reason"] == "AwaitingConfirmation"
    assert "spec.confirm" in blocked["message"]
    assert not [s for s in world.applies("confirm") if s.startswith("staging")]
    patch = json.dumps({"spec": {"confirm": "a9s-pg"}})
    result = world.kubectl(
        "patch", "pgr", "confirm", "-n", world.namespace, "--type=merge", "-p", patch
    )
    assert result.returncode == 0, result.stderr
    world.wait_condition("confirm", "Succeeded")
    assert world.conditions("confirm").get("SpecChangeIgnored", {}).get("status") != "True"


def test_dry_run_stops_before_staging_with_a_report(world: World) -> None:
    assert world.kubectl.apply(world.manifest("dry", dryRun=True)).returncode == 0
    wait_for(
        lambda: (
            world.conditions("dry").get("Blocked", {}).get("reason") == "DryRunComplete" or None
        ),
        timeout=60,
        message="DryRunComplete",
    )
    status = world.status("dry")
    assert status["phase"] == "Decrypting"
    assert "dry run complete" in status["message"]
    assert not [s for s in world.applies("dry") if s.startswith("staging")]


def test_spec_edit_after_start_is_ignored_visibly(world: World) -> None:
    assert world.kubectl.apply(world.manifest("frozen", deployment="slow-decrypt")).returncode == 0
    wait_for(lambda: "decrypting-2" in world.applies("frozen") or None, timeout=60)
    patch = json.dumps({"spec": {"target": {"postgresMajorVersion": 14}}})
    assert (
        world.kubectl(
            "patch", "pgr", "frozen", "-n", world.namespace, "--type=merge", "-p", patch
        ).returncode
        == 0
    )
    wait_for(
        lambda: (
            world.conditions("frozen").get("SpecChangeIgnored", {}).get("status") == "True" or None
        ),
        timeout=30,
        message="SpecChangeIgnored",
    )
    world.wait_condition("frozen", "Succeeded", timeout=120)
    assert world.status("frozen")["acceptedSpec"]["target"]["postgresMajorVersion"] == 15


def test_deleting_a_running_recovery_stops_it_and_releases_the_finalizer(world: World) -> None:
    assert world.kubectl.apply(world.manifest("doomed", deployment="slow-decrypt")).returncode == 0
    wait_for(lambda: "decrypting-2" in world.applies("doomed") or None, timeout=60)
    obj = world.kubectl.json("pgr", "doomed", "-n", world.namespace)
    assert "pgrecovery.dev/finalizer" in obj["metadata"]["finalizers"]
    result = world.kubectl("delete", "pgr", "doomed", "-n", world.namespace, "--timeout=60s")
    assert result.returncode == 0, result.stderr
    gone = world.kubectl.get("pgr", "doomed", "-n", world.namespace)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
    # kopf posts Events from a background queue: the Deleted one may land just after.
    wait_for(
        lambda: any(e["reason"] == "Deleted" for e in world.events("doomed")) or None,
        timeout=30,
        message="the Deleted event",
    )
    deleted = [e for e in world.events("doomed") if e["reason"] == "Deleted"]
    assert len(deleted) == 1
    assert "deleted during Decrypting" in deleted[0]["message"]
    assert "work stopped at a safe point" in deleted[0]["message"]
    applies = world.applies("doomed")
    assert "staging-1" not in applies


def test_two_recoveries_of_one_deployment_never_overlap_destructively(world: World) -> None:
    assert world.kubectl.apply(world.manifest("first", deployment="slow-staging")).returncode == 0
    wait_for(lambda: "staging-2" in world.applies("first") or None, timeout=60)
    assert world.kubectl.apply(world.manifest("second", deployment="slow-staging")).returncode == 0
    wait_for(
        lambda: world.conditions("second").get("Blocked", {}).get("status") == "True" or None,
        timeout=60,
        message="the second recovery to wait",
    )
    blocked = world.conditions("second")["Blocked"]
    assert blocked["reason"] == "DeploymentBusy"
    assert f"{world.namespace}/first" in blocked["message"]
    assert not [s for s in world.applies("second") if s.startswith("staging")]
    world.wait_condition("first", "Succeeded")
    world.wait_condition("second", "Succeeded", timeout=120)
    first_done = world.status("first")["completedAt"]
    second_staging = next(
        s for s in world.status("second")["steps"] if s["name"] == "staging-1"
    )
    # Steps carry milliseconds, completedAt whole seconds: compare at whole seconds.
    assert _second(second_staging["startedAt"]) >= _second(first_done)


def _second(stamp: str) -> int:
    """An RFC 3339 status time (with or without a fraction) as whole epoch seconds."""
    return int(datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
