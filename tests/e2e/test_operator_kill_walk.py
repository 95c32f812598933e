"""SIGKILL the operator at every step of a real recovery and inside the long steps; it completes.

A real `kopf run -m pgrecovery.main` (the real a9s plan), on the real kube-apiserver under the
Helm chart's ServiceAccount token and Role, restores the simulated 3-VM a9s-pg cluster from a
real S3 server. The walk kills the operator (`KopfProcess.kill()`, as a node loss
or an OOM kill would) at every point below, in order, and starts it again each time:

- before every step of the plan (its step list is taken from the plan itself, so a step added
  to the plan is walked too): the operator's breakpoints (`engine/breakpoints.py`,
  `PGRECOVERY_BREAKPOINT_DIR`) stop it there, and it says so in a file, so the kill lands
  exactly between two steps on any machine, however short the steps are;
- twice inside the dump stream (download → decrypt → gunzip → upload is one pipeline,
  `stage-dump`): the S3 server sits behind the fault proxy, whose gates hold the GETs of the
  parts from 40 % and from 80 % of the backup on, so the stream stops below half and again above
  half and waits there; the kill comes while it waits and the gate opens after the restart;
- inside the restore job on the primary (`restore-dump`) and inside a standby's clone job
  (`ensure-standbys-recloned`, one standby streaming, the other cloning): a hold file on the VM
  (`<jobs root>/hold-<prefix>`, `adapters/jobs.py`) keeps the job running at its start; the
  operator is killed while the job runs, and the hold is lifted only once the restarted operator
  has re-attached to the running job.

Nothing here depends on seeing a moment by polling: every point is a state the recovery is held
in until the walk lets it go. The walk reads the status (a raw GET) only to see such a held
state and to check that the restarted operator went past each kill point.

Afterwards: the recovery is `Succeeded` with no failed step and no retry, the data equals the
backup's on every node, the cluster is healthy, the staged dump's checksum is the backup's, the
streamed dump was resumed (parts kept, upload continued), one more kill after completion changes
nothing, and no secret value appears in the status, the events or the operator log. The report
(printed, and the message of every assertion) lists each kill point with what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.engine.breakpoints import before_step
from tests.e2e.operator_harness import NAMESPACE, real_recovery_operator
from tests.e2e.operator_harness import Operator as HarnessOperator
from tests.faults.proxy import Fault, FaultProxy, fault_proxy, gate
from tests.kubeapi.harness import KopfProcess, Kubectl, log_problems
from tests.objectstores.servers import S3Server
from tests.plan_steps import plan_of
from tests.realkube.server import RealKubeAPI
from tests.scenario import Scenario, leftover_scan
from tests.simcluster.cluster import SimCluster, SimVM

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.vms,
    pytest.mark.slow,
    # ~28 kills, each a kopf restart plus the phase's re-run; far more than one recovery.
    pytest.mark.timeout(1200),
]

NAME = "kill-walk"
ROWS = 250_000  # a ~100 MiB dump: long enough that the parallel restore has real tasks
PART_SIZE = 256 * 1024  # ~30 MiB encrypted → ~120 parts, so the gates can cut it finely
# Status is written once per poll; the walk reads it 5 times as often.
POLL_INTERVAL = "0.25"
OBSERVE_INTERVAL = 0.05
STEP_TIMEOUT = 180.0
JOBS_ROOT = "/var/vcap/store/pgrecovery/jobs"  # adapters/jobs.py DEFAULT_JOBS_ROOT
FINISHED = ("Succeeded", "Skipped")


# ---------------------------------------------------------------------- the operator


class Operator:
    """The harness's operator, plus what the walk needs: a raw status GET and the log."""

    def __init__(self, harness: HarnessOperator, breakpoints: Path) -> None:
        self.harness, self.api, self.kubectl = harness, harness.api, harness.kubectl
        self.process = harness.process
        self.breakpoints = breakpoints
        self.path = (f"/apis/pgrecovery.dev/v1alpha1/namespaces/{harness.namespace}/"
                     f"pgrecoveries/{NAME}")

    def apply(self, *objects: dict[str, Any]) -> None:
        self.harness.apply(*objects)

    def status(self) -> dict[str, Any]:
        """A raw GET (not kubectl: spawning kubectl 20 times a second would load the machine)."""
        code, obj = self.api.request("GET", self.path)
        assert code == 200, obj
        return obj.get("status") or {}

    def events(self) -> list[dict[str, Any]]:
        return self.harness.events(NAME)

    def log_tail(self) -> str:
        return self.process.log_text()[-4000:]


@pytest.fixture
def operator(
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    real_namespace: str,
    tmp_path: Path,
) -> Operator:
    """The real operator on the real API server, in the test's own namespace, under the
    chart's ServiceAccount token and Role."""
    breakpoints = tmp_path / "breakpoints"
    breakpoints.mkdir()
    harness = real_recovery_operator(
        real_kube_api, real_kubectl, real_kopf_operator, real_namespace, tmp_path / "work",
        env={"PGRECOVERY_POLL_INTERVAL": POLL_INTERVAL,
             "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)},
    )
    return Operator(harness, breakpoints)


@pytest.fixture
def gated_s3(moto_s3: S3Server) -> Iterator[FaultProxy]:
    with fault_proxy(moto_s3.endpoint_url) as proxy:
        yield proxy


# ---------------------------------------------------------------------- observations


def _conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def _steps(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status.get("steps", [])}


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _nodes(status: dict[str, Any]) -> dict[str, str]:
    return {n["name"]: n.get("state") or "?" for n in status.get("nodes", [])}


def _step_list(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["state"]) for s in status.get("steps", [])]


def _running(status: dict[str, Any], step: str) -> bool:
    return _steps(status).get(step, {}).get("state") == "Running"


def _fresh_progress(status: dict[str, Any], after: float) -> dict[str, Any] | None:
    """The progress, if the operator started at `after` (a whole second, see `Walk.run`) wrote
    it. `lastProgressAt` has whole seconds."""
    progress = status.get("progress") or {}
    return progress if _epoch(progress.get("lastProgressAt")) >= after else None


# ---------------------------------------------------------------------- kill points

# What a point sees: (status, wall clock of the latest restart) → what was seen, or None.
Seen = Callable[[dict[str, Any], float], str | None]


@dataclass
class Point:
    """One place to kill at. `reached` must become true and stay true until `release`."""

    name: str
    step: str
    reached: Seen
    release: Callable[[], None]
    release_after_restart: bool = False
    # Inside a VM job: the restarted operator must be seen back in the step (re-attached to the
    # still-held job) before the hold is lifted.
    reattached: Seen | None = None
    # Called while waiting, to move the recovery towards the point (e.g. let the first standby's
    # clone go so that the second one is the one held).
    nudge: Callable[[dict[str, Any]], None] | None = None


@dataclass
class Kill:
    point: str
    phase: str
    seen: str
    steps_at_kill: list[tuple[str, str]]
    killed_at: float  # monotonic
    resumed_after: float | None = None  # s until the restarted operator reached the next point
    reattach: str = ""


class World:
    """The holds of the walk: operator breakpoints, S3 gates, job holds on the VMs."""

    def __init__(self, op: Operator, cluster: SimCluster, proxy: FaultProxy) -> None:
        self.op, self.cluster, self.proxy = op, cluster, proxy

    # operator breakpoints
    def arm(self, name: str) -> None:
        (self.op.breakpoints / f"{name}.hold").touch()

    def reached(self, name: str) -> bool:
        return (self.op.breakpoints / f"{name}.reached").exists()

    def disarm(self, name: str) -> None:
        for suffix in (".hold", ".reached"):
            (self.op.breakpoints / f"{name}{suffix}").unlink(missing_ok=True)

    # S3 gates over a range of parts
    def gate_parts(self, keys: list[str]) -> Fault:
        pattern = "/(" + "|".join(k.replace(".", r"\.") for k in keys) + r")(\?|$)"
        fault = gate(method="GET", path=pattern)
        self.proxy.add(fault)
        return fault

    # job holds on the VMs
    @staticmethod
    def hold_jobs(vm: SimVM, prefix: str) -> None:
        vm.run(f"mkdir -p -m 0700 {JOBS_ROOT} && touch {JOBS_ROOT}/hold-{prefix}")

    @staticmethod
    def release_jobs(vm: SimVM, prefix: str) -> None:
        vm.run(f"rm -f {JOBS_ROOT}/hold-{prefix}")

    @staticmethod
    def held_jobs(vm: SimVM, prefix: str) -> list[str]:
        """Jobs of that prefix on the VM that have started and not ended."""
        out = vm.run(
            f"for d in {JOBS_ROOT}/{prefix}*/; do [ -d \"$d\" ] && [ ! -e \"$d/exit\" ] "
            "&& basename \"$d\"; done; true"
        ).stdout
        return out.split()


def boundary(world: World, step: str) -> Point:
    name = before_step(step)
    world.arm(name)
    return Point(
        name=name,
        step=step,
        reached=lambda _s, _a: "held before the step" if world.reached(name) else None,
        release=lambda: world.disarm(name),
    )


def inside_stage_dump(world: World, label: str, low: float, high: float, fault: Fault) -> Point:
    def reached(status: dict[str, Any], after: float) -> str | None:
        progress = _fresh_progress(status, after)
        if not _running(status, "stage-dump") or not progress or not progress.get(
            "phaseBytesTotal"
        ):
            return None
        fraction = progress.get("phaseBytesDone", 0) / progress["phaseBytesTotal"]
        return f"{fraction:.0%}: {progress.get('detail', '')}" if low <= fraction < high else None

    return Point(
        name=f"inside stage-dump {label}",
        step="stage-dump",
        reached=reached,
        release=lambda: world.proxy.open(fault),
        release_after_restart=True,
    )


def inside_restore(world: World) -> Point:
    primary = world.cluster.vms[0]  # the healthy cluster's primary (checked below)
    for vm in world.cluster.vms:  # whichever the primary is, its restore job is held
        world.hold_jobs(vm, "restore")
        world.hold_jobs(vm, "prestore")

    def reached(status: dict[str, Any], after: float) -> str | None:
        detail = str((_fresh_progress(status, after) or {}).get("detail", ""))
        if not (_running(status, "restore-dump") and detail.startswith("restored")):
            return None
        vm = world.cluster.vm(status.get("primary") or primary.name)
        jobs = world.held_jobs(vm, "restore") + world.held_jobs(vm, "prestore")
        return f"{detail}; job {', '.join(jobs)} running on {vm.name}" if jobs else None

    def release() -> None:
        for vm in world.cluster.vms:
            world.release_jobs(vm, "restore")
            world.release_jobs(vm, "prestore")

    def reattached(status: dict[str, Any], after: float) -> str | None:
        detail = str((_fresh_progress(status, after) or {}).get("detail", ""))
        ok = _running(status, "restore-dump") and detail.startswith("restored")
        return f"re-attached: {detail}" if ok else None

    return Point("inside restore-dump", "restore-dump", reached, release,
                 release_after_restart=True, reattached=reattached)


def inside_reclone(world: World) -> Point:
    step = "ensure-standbys-recloned"
    for vm in world.cluster.vms:
        world.hold_jobs(vm, "clone")

    def reached(status: dict[str, Any], _after: float) -> str | None:
        states = _nodes(status)
        if not _running(status, step):
            return None
        cloning = [n for n, s in states.items() if s == "recloning"]
        streaming = [n for n, s in states.items() if s == "streaming"]
        if not (cloning and streaming):
            return None
        held = world.held_jobs(world.cluster.vm(cloning[0]), "clone")
        return f"{streaming[0]} streaming, {cloning[0]} cloning ({', '.join(held)})" if held \
            else None

    def nudge(status: dict[str, Any]) -> None:
        # The first standby's clone goes through; the second one's is the one held.
        states = _nodes(status)
        if "streaming" not in states.values():
            for name, state in states.items():
                if state == "recloning":
                    world.release_jobs(world.cluster.vm(name), "clone")

    def release() -> None:
        for vm in world.cluster.vms:
            world.release_jobs(vm, "clone")

    def reattached(status: dict[str, Any], after: float) -> str | None:
        record = _steps(status).get(step, {})
        ok = record.get("state") == "Running" and _epoch(record.get("startedAt")) >= after
        return "re-entered the step, the clone job still held" if ok else None

    return Point(f"inside {step}", step, reached, release, release_after_restart=True,
                 reattached=reattached, nudge=nudge)


def inside_cleanup(world: World) -> Point:
    """After the VMs were cleaned, before the work volume: the journal and job records the
    earlier Rejoined steps resume from are gone, so the restarted operator must not run them
    again (it would truncate repmgr and wipe the standbys a second time)."""
    name = "inside-ensure-recovery-files-removed"
    world.arm(name)
    return Point(
        name=name,
        step="ensure-recovery-files-removed",
        reached=lambda _s, _a: "VMs cleaned, work volume not yet" if world.reached(name) else None,
        release=lambda: world.disarm(name),
    )


def points_for(plan: tuple[tuple[str, tuple[str, ...]], ...], world: World,
               backup_parts: list[str]) -> list[Point]:
    """Every step boundary in plan order, with the inside points after their step's start.
    All holds are armed here, before the recovery is applied."""
    count = len(backup_parts)
    low_gate = world.gate_parts(backup_parts[int(count * 0.4) : int(count * 0.8)])
    high_gate = world.gate_parts(backup_parts[int(count * 0.8) :])
    points: list[Point] = []
    for _phase, steps in plan:
        for step in steps:
            points.append(boundary(world, step))
            if step == "stage-dump":
                points.append(inside_stage_dump(world, "<50%", 0.10, 0.50, low_gate))
                points.append(inside_stage_dump(world, ">=50%", 0.50, 0.98, high_gate))
            elif step == "restore-dump":
                points.append(inside_restore(world))
            elif step == "ensure-standbys-recloned":
                points.append(inside_reclone(world))
            elif step == "ensure-recovery-files-removed":
                points.append(inside_cleanup(world))
    return points


@dataclass
class Walk:
    op: Operator
    kills: list[Kill] = field(default_factory=list)
    restarted: float = 0.0  # wall clock of the latest restart (what "fresh" is measured from)

    def observe(self) -> dict[str, Any]:
        status = self.op.status()
        if _conditions(status).get("Failed") == "True":
            pytest.fail(
                f"the recovery failed after kills at {[k.point for k in self.kills]}: "
                f"{status.get('failureReason')}: {status.get('message')}\n"
                f"steps: {_step_list(status)}\nlog tail:\n{self.op.log_tail()}"
            )
        return status

    def wait(self, what: str, seen: Seen,
             nudge: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], str]:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            status = self.observe()
            detail = seen(status, self.restarted)
            if detail is not None:
                return status, detail
            if _conditions(status).get("Succeeded") == "True":
                pytest.fail(f"{what}: the recovery completed without reaching it; "
                            f"kills {[k.point for k in self.kills]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{what} not reached in {STEP_TIMEOUT} s; phase {status.get('phase')}, "
                    f"nodes {_nodes(status)}, steps {_step_list(status)}\n"
                    f"log tail:\n{self.op.log_tail()}"
                )
            if nudge is not None:
                nudge(status)
            time.sleep(OBSERVE_INTERVAL)

    def run(self, points: list[Point]) -> None:
        for point in points:
            status, detail = self.wait(point.name, point.reached, point.nudge)
            now = time.monotonic()
            if self.kills:
                self.kills[-1].resumed_after = now - self.kills[-1].killed_at
            self.op.process.kill()
            kill = Kill(point.name, str(status.get("phase")), detail, _step_list(status),
                        time.monotonic())
            self.kills.append(kill)
            if not point.release_after_restart:
                point.release()
            # Start in the next whole second: status times of the killed process are then all
            # earlier than `restarted`, and every time the new one writes is at or after it.
            self.restarted = float(int(time.time()) + 1)
            time.sleep(max(0.0, self.restarted - time.time()))
            self.op.process.start()
            if point.reattached is not None:
                _, kill.reattach = self.wait(f"{point.name} (re-attach)", point.reattached)
            if point.release_after_restart:
                point.release()


# ---------------------------------------------------------------------- the test


def _line(kill: Kill) -> str:
    after = (
        f"resumed, next point reached {kill.resumed_after:.1f} s after the kill"
        if kill.resumed_after is not None
        else "NOT resumed"
    )
    reattach = f"; {kill.reattach}" if kill.reattach else ""
    seen = f" [{kill.seen}]" if kill.seen else ""
    return f"    {kill.point} ({kill.phase}){seen}{reattach} → {after}\n"


def test_operator_killed_at_every_step_and_inside_long_steps_completes(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    gated_s3: FaultProxy,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=ROWS, part_size=PART_SIZE)
    assert healthy_sim_cluster.primary().name == healthy_sim_cluster.vms[0].name
    manifest = scenario.manifest(NAME, NAMESPACE)
    manifest["spec"]["source"]["s3"]["endpoint"] = gated_s3.url_for(moto_s3.endpoint_url)
    # One re-clone at a time, so "one standby done, the other cloning" is a point to kill at.
    manifest["spec"]["parallelism"] = {"standbyReclones": 1}
    plan = plan_of(manifest, tmp_path / "plan-work")
    plan_steps = [step for _, steps in plan for step in steps]
    world = World(operator, healthy_sim_cluster, gated_s3)
    points = points_for(plan, world, [p.key for p in scenario.backup.parts])

    walk_started = time.monotonic()
    operator.apply(*scenario.kube_secrets(NAMESPACE), manifest)
    walk = Walk(operator)
    walk.restarted = float(int(time.time()))
    walk.run(points)
    deadline = time.monotonic() + 300
    while _conditions(status := walk.observe()).get("Succeeded") != "True":
        assert time.monotonic() < deadline, f"not Succeeded: {status}\n{operator.log_tail()}"
        time.sleep(OBSERVE_INTERVAL)
    walk.kills[-1].resumed_after = time.monotonic() - walk.kills[-1].killed_at
    walk_seconds = time.monotonic() - walk_started

    # One more kill after completion: the restarted operator must not run anything again.
    operator.process.kill()
    operator.process.start()
    time.sleep(4 * float(POLL_INTERVAL) + 2)
    again = operator.status()
    rerun = again != status

    facts = status.get("facts", {})
    events = operator.events()
    failed_steps = [e["message"] for e in events if e["reason"] == "StepFailed"]
    retries = {k: v for k, v in facts.items() if k.startswith("retries")}
    problems = log_problems(operator.process.log_text())
    boundaries = sum(p.name.startswith("before-") for p in points)
    report = (
        f"kill walk: {len(walk.kills)} kills at {len(points)} points ({boundaries} step "
        f"boundaries of the plan's {len(plan_steps)} steps, {len(points) - boundaries} inside "
        f"long steps), {sum(k.resumed_after is not None for k in walk.kills)} resumed; "
        f"Succeeded {walk_seconds:.0f} s after kubectl apply\n"
        + "".join(map(_line, walk.kills))
        + f"  after completion: one more kill and restart "
        f"{'CHANGED the status' if rerun else 'changed nothing'}\n"
        f"  stage-dump: {facts.get('stagedBytes')}\n"
        f"  restore: {facts.get('restoreMode')}; {facts.get('restoreReport')}\n"
        f"  StepFailed events: {failed_steps or 'none'}; phase retries: {retries or 'none'}; "
        f"operator log warnings/errors: {problems[:5] or 'none'}"
    )
    print("\n" + report)

    # Every point was a kill, every kill was recovered from, the recovery as a whole is right.
    assert [k.point for k in walk.kills] == [p.name for p in points], report
    assert all(k.resumed_after is not None for k in walk.kills), report
    assert not rerun, f"{report}\nbefore: {status}\nafter: {again}"
    assert status["phase"] == "Rejoined", report
    steps = _steps(status)
    assert list(steps) == plan_steps, f"the plan ran other steps: {list(steps)}\n{report}"
    assert all(s["state"] in FINISHED for s in steps.values()), report
    assert _conditions(status).get("Stalled") == "False", report
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256, report
    restored = scenario.restored_everywhere()
    assert restored == {vm.name: True for vm in healthy_sim_cluster.vms}, f"{restored}\n{report}"
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok, report
    # The kills inside the stream resumed it: parts kept on the work volume were reused and
    # the upload continued at the byte the primary already had.
    assert "kept 0," not in facts["stagedBytes"], report
    assert "resumed at" in facts["stagedBytes"], report
    # A kill is not a failure: no step failed and nothing was retried because of one.
    assert not failed_steps, report
    assert not retries, report
    assert not problems, report
    # Nothing of the recovery is left on any VM (hold files of the walk included) nor on the
    # operator's work volume; the steps before the cleanup ran once (kills resumed them, the
    # kill inside the cleanup did not make them run again).
    scan = leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
    print("leftover scan:", scan or "nothing")
    assert not scan, f"{scan}\n{report}"
    cleanup_at = plan_steps.index("ensure-recovery-files-removed")
    reran = [
        e["message"] for e in events
        if e["reason"] == "StepStarted"
        and _epoch(e.get("lastTimestamp") or e.get("eventTime")) >= walk.restarted
        and any(f"Rejoined/{step}" == e["message"] for step in plan_steps[:cleanup_at])
    ]
    assert walk.kills[-1].point == "inside-ensure-recovery-files-removed", report
    assert not reran, f"steps ran again after the kill inside the cleanup: {reran}\n{report}"

    texts = {
        "status": yaml.safe_dump(again),
        "events": yaml.safe_dump(events),
        "operator log": operator.process.log_text(),
    }
    for secret in scenario.secret_strings():
        for where, text in texts.items():
            assert secret not in text, f"a secret value appears in the {where}"
    print(f"test total {time.monotonic() - started:.0f} s (scenario and backup included)")
