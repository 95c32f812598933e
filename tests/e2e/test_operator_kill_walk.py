"""SIGKILL the operator at every step of a real recovery and inside the long steps; it completes.

A real `kopf run -m pgrecovery.main` (the real a9s plan) restores the simulated 3-VM a9s-pg
cluster from a real S3 server. The test walks the plan's 22 steps in order: for each it waits
until the step is seen `Running` or finished in the resource's status, SIGKILLs the operator
(`KopfProcess.kill()`, as a node loss or an OOM kill would) and starts it again. It also kills
inside each long step: twice while the dump streams (download → decrypt → gunzip → upload to
the primary are one pipeline in this design, `stage-dump`: once below and once above half of
the bytes), while the restore job runs on the primary (`restore-dump`), and while the standbys
re-clone (`ensure-standbys-recloned`: one standby streaming, the other cloning). Afterwards:
the recovery is `Succeeded` with no failed step and no retry, the data equals the backup's on
every node, the cluster is healthy, the staged dump's checksum is the backup's, the streamed
dump was resumed (parts kept, upload continued), one more kill after completion changes
nothing, and no secret value appears in the status, the events or the operator log. The report
(printed, and the message of every assertion) lists each kill point as seen.

What "seen" means, honestly: the operator writes status once per poll (PGRECOVERY_POLL_INTERVAL
0.25 s here, so that steps shorter than a second can be seen at all) and the test reads it with
a raw GET every 0.05 s; the operator may be up to one status write further than what a kill
point is labelled with. Only records written after the latest kill count (their timestamps are
in a later second), so a status left over from before a kill never triggers the next one. After
every restart the phase starts again from its first step (the engine's resume model: idempotent
steps, checks skip finished work), so each step of the phase gets a fresh chance to be seen. A
step seen only as finished is still a kill point, labelled with what was seen. One kill counts
for several targets only when they hold in the same sighting (dedupe), or when a step finished
in a phase that was over at the kill (nothing can see it again); the report says which. Steps
that are never seen are reported as not caught; only the plan's last two steps may be (together
they take less than one status write and end the recovery, so no restart re-runs them).

The restore job runs on the primary and goes on while the operator restarts; a kill for an
earlier step sighted once Restoring has begun is held until the restore is seen running, so the
restarts do not let it finish unseen (`Walk.guarded`).

To make the long steps last several seconds the scenario is large (250 000 rows per table →
a ~100 MiB dump, ~30 MiB encrypted in 256 KiB parts), the S3 server sits behind the fault
proxy throttling each ranged GET to 1 MB/s, and the standbys re-clone one at a time
(`spec.parallelism.standbyReclones: 1`); everything else is real and unthrottled.
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

from tests.e2e.operator_harness import NAMESPACE, free_port, start_recovery_operator
from tests.faults.proxy import FaultProxy, fault_proxy, throttle
from tests.kubeapi.harness import KopfProcess, KubeAPI, Kubectl, log_problems
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario
from tests.simcluster.cluster import SimCluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.vms,
    pytest.mark.slow,
    # ~25 kills, each a kopf restart plus the phase's re-run; far more than one recovery.
    pytest.mark.timeout(1200),
]

NAME = "kill-walk"
OBJECT_PATH = f"/apis/pgrecovery.dev/v1alpha1/namespaces/{NAMESPACE}/pgrecoveries/{NAME}"
ROWS = 250_000  # write_sample_data overflows int above ~270 000
PART_SIZE = 256 * 1024
THROTTLE_BYTES_PER_S = 1_000_000  # per ranged GET; the download runs several in parallel
# Status is written once per poll; the walk reads it 5 times as often.
POLL_INTERVAL = "0.25"
OBSERVE_INTERVAL = 0.05
STEP_TIMEOUT = 180.0

# The a9s logical plan (operator/pgrecovery/engine/plans/a9s_logical.py), newSite false, in
# the order it runs. Checked against the final status, so a change of the plan shows here.
PLAN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Fetching", ("resolve-backup", "check-encryption-key", "probe-cluster", "check-free-space")),
    ("Decrypting", ("ensure-restore-dir", "stage-dump")),
    (
        "Staging",
        (
            "ensure-standbys-stopped",
            "ensure-repmgr-stopped-on-primary",
            "ensure-inactive-slots-dropped",
            "ensure-connections-blocked",
            "ensure-startup-locks-clear",
        ),
    ),
    (
        "Restoring",
        ("ensure-bulk-load-settings", "restore-dump", "ensure-bulk-load-settings-reverted"),
    ),
    (
        "Rejoined",
        (
            "ensure-repmgr-schema-truncated",
            "ensure-primary-registered",
            "ensure-repmgr-running-on-primary",
            "ensure-clone-marker",
            "ensure-standbys-recloned",
            "verify-cluster",
            "ensure-staging-file-removed",
            "ensure-connections-unblocked",
        ),
    ),
)
# The plan's last steps: after the standbys stream they take well under one status write
# together and then the recovery is complete, so no later restart re-runs them.
TOO_FAST_TO_CATCH = ("ensure-staging-file-removed", "ensure-connections-unblocked")
# Two SQL statements and a reload each (0.1-0.2 s): on a loaded machine they can start and end
# between two status writes (every POLL_INTERVAL) and pass unseen; each is idempotent and its
# crash cases (marker written, settings applied, reverted) are in tests/unit/test_bulk_load.py.
MAY_PASS_UNSEEN = (*TOO_FAST_TO_CATCH, "ensure-bulk-load-settings",
                   "ensure-bulk-load-settings-reverted")
PLAN_STEPS = tuple(step for _, steps in PLAN for step in steps)
FINISHED = ("Succeeded", "Skipped")
REACHED = ("Running", *FINISHED)


# ---------------------------------------------------------------------- the operator


class Operator:
    def __init__(self, api: KubeAPI, kubectl: Kubectl, process: KopfProcess) -> None:
        self.api, self.kubectl, self.process = api, kubectl, process

    def apply(self, *objects: dict[str, Any]) -> None:
        result = self.kubectl.apply(yaml.safe_dump_all(objects))
        assert result.returncode == 0, result.stderr

    def status(self) -> dict[str, Any]:
        """A raw GET (not kubectl: spawning kubectl 20 times a second would load the machine
        whose timing is being probed)."""
        code, obj = self.api.request("GET", OBJECT_PATH)
        assert code == 200, obj
        return obj.get("status") or {}

    def events(self) -> list[dict[str, Any]]:
        items = self.kubectl.json("events", "-n", NAMESPACE)["items"]
        return [e for e in items if e["involvedObject"]["name"] == NAME]

    def log_tail(self) -> str:
        return self.process.log_text()[-4000:]


@pytest.fixture
def operator(
    kube_api: KubeAPI,
    kubectl: Kubectl,
    kopf_operator_subprocess: Callable[..., KopfProcess],
    tmp_path: Path,
) -> Operator:
    process = start_recovery_operator(
        kube_api, kopf_operator_subprocess, tmp_path / "work", metrics_port=free_port(),
        env={"PGRECOVERY_POLL_INTERVAL": POLL_INTERVAL},
    )
    return Operator(kube_api, kubectl, process)


@pytest.fixture
def slow_s3(moto_s3: S3Server) -> Iterator[FaultProxy]:
    """moto behind the fault proxy, each ranged GET (a part's bytes) at 1 MB/s."""
    with fault_proxy(moto_s3.endpoint_url) as proxy:
        proxy.add(throttle(THROTTLE_BYTES_PER_S, method="GET", ranged=True))
        yield proxy


# ---------------------------------------------------------------------- observations


def _conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def _steps(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status.get("steps", [])}


def _epoch(stamp: str | None) -> float:
    """A status time in whole seconds. Step times carry milliseconds; the kill is known to the
    second, so "written after the kill" means "in a later second", as before."""
    if not stamp:
        return 0.0
    return float(int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()))


def _written_after(record: dict[str, Any], second: float) -> bool:
    """The record was (re)written by an operator process started after `second` (the kill's
    whole second): its start or finish stamp is in a later second."""
    return max(_epoch(record.get("startedAt")), _epoch(record.get("finishedAt"))) > second


def _later_fresh(steps: dict[str, dict[str, Any]], step: str, after: float) -> bool:
    """A step after `step` in the plan was (re)written after the kill at `after`."""
    index = PLAN_STEPS.index(step)
    return any(
        name in PLAN_STEPS and PLAN_STEPS.index(name) > index and _written_after(record, after)
        for name, record in steps.items()
    )


def _nodes(status: dict[str, Any]) -> str:
    return " ".join(f"{n['name']}={n.get('state') or '?'}" for n in status.get("nodes", []))


def _step_list(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["state"]) for s in status.get("steps", [])]


@dataclass
class KillPoint:
    target: str  # the target that triggered the kill
    step: str
    phase: str  # the status phase in the sighted status
    state: str  # the step's state in the sighted status
    detail: str = ""
    also: list[str] = field(default_factory=list)  # further targets this kill covered
    late: bool = False  # the recovery had completed by the kill
    killed_second: float = 0.0  # wall clock, whole seconds
    killed_at: float = 0.0  # monotonic
    kill_lag: float = 0.0  # s from the sighting to the dead process
    status_at_kill: dict[str, Any] = field(default_factory=dict, repr=False)
    resumed_after: float | None = None  # s from the kill until the restarted operator was past it

    def label(self) -> str:
        text = f"{self.target}: {self.step} {self.state} ({self.phase})"
        if self.detail:
            text += f" [{self.detail}]"
        if self.also:
            text += f"; also covers {', '.join(self.also)}"
        return text


# A mid-step condition: (status, the latest kill's whole second) → what was seen, or None.
MidCondition = Callable[[dict[str, Any], float], str | None]


@dataclass(frozen=True)
class Target:
    kind: str  # "boundary" | "mid"
    step: str
    name: str
    when: MidCondition | None = None
    guard: bool = False  # see Walk.guarded


def _fresh_progress(status: dict[str, Any], after: float) -> dict[str, Any] | None:
    progress = status.get("progress") or {}
    return progress if _epoch(progress.get("lastProgressAt")) > after else None


def _mid_stage_dump(low: float, high: float) -> MidCondition:
    def when(status: dict[str, Any], after: float) -> str | None:
        progress = _fresh_progress(status, after)
        if progress is None or not progress.get("phaseBytesTotal"):
            return None
        fraction = progress.get("phaseBytesDone", 0) / progress["phaseBytesTotal"]
        return f"{fraction:.0%}: {progress.get('detail', '')}" if low <= fraction < high else None

    return when


def _mid_restore(status: dict[str, Any], after: float) -> str | None:
    # The job was started on the primary and polled, still running, by this process.
    detail = str((_fresh_progress(status, after) or {}).get("detail", ""))
    return detail if detail.startswith("restored") else None


def _mid_reclone(status: dict[str, Any], _after: float) -> str | None:
    # One standby re-cloned and streaming, the other one's clone job running (the re-clones
    # run one at a time here: spec.parallelism.standbyReclones 1).
    nodes = _nodes(status)
    return nodes if "streaming" in nodes and "recloning" in nodes else None


def _targets() -> list[Target]:
    targets: list[Target] = []
    for step in PLAN_STEPS:
        if step == "restore-dump":
            # The restore is a job on the primary that goes on while the operator restarts,
            # and lasts only a few seconds: kill inside it first (seen running by this
            # operator), then at its boundary (seen by the restarted operator, which
            # re-attaches to the job or finds it done).
            targets.append(Target("mid", step, "inside restore-dump", _mid_restore, guard=True))
        targets.append(Target("boundary", step, f"boundary {step}"))
        if step == "stage-dump":
            # Download, decryption and upload are one pipeline in the operator: kill it early
            # and late (each kill stops the stream; the restarted operator resumes it).
            targets.append(
                Target("mid", step, "inside stage-dump <50%", _mid_stage_dump(0.10, 0.50))
            )
            targets.append(
                Target("mid", step, "inside stage-dump >=50%", _mid_stage_dump(0.50, 0.98))
            )
        elif step == "ensure-standbys-recloned":
            targets.append(Target("mid", step, "inside ensure-standbys-recloned", _mid_reclone))
    return targets


TARGETS = _targets()
PHASE_INDEX = {phase: i for i, (phase, _) in enumerate(PLAN)}
STEP_PHASE_INDEX = {step: i for i, (_, steps) in enumerate(PLAN) for step in steps}


@dataclass
class Walk:
    op: Operator
    points: list[KillPoint] = field(default_factory=list)
    covered: dict[str, KillPoint] = field(default_factory=dict)  # target name → its kill
    missed: list[str] = field(default_factory=list)
    after: float = 0.0  # whole second of the latest kill: later stamps are the new process's

    def observe(self) -> dict[str, Any]:
        status = self.op.status()
        if _conditions(status).get("Failed") == "True":
            pytest.fail(
                f"the recovery failed after kill points {[p.label() for p in self.points]}: "
                f"{status.get('failureReason')}: {status.get('message')}\n"
                f"steps: {_step_list(status)}\nlog tail:\n{self.op.log_tail()}"
            )
        now = time.monotonic()
        for point in self.points:
            if point.resumed_after is None and self._past(status, point):
                point.resumed_after = now - point.killed_at
        return status

    @staticmethod
    def _past(status: dict[str, Any], point: KillPoint) -> bool:
        """The restarted operator finished the killed step, or a later one, or the recovery."""
        if point.late:  # nothing was left to resume; it must stay complete
            return _conditions(status).get("Succeeded") == "True"
        if status == point.status_at_kill:
            return False
        if _conditions(status).get("Succeeded") == "True":
            return True
        steps = _steps(status)
        if steps.get(point.step, {}).get("state") not in FINISHED:
            return False
        index = PLAN_STEPS.index(point.step)
        return any(
            name in PLAN_STEPS
            and PLAN_STEPS.index(name) >= index
            and record["state"] in FINISHED
            and _epoch(record.get("finishedAt")) > point.killed_second
            for name, record in steps.items()
        )

    def holds(self, target: Target, status: dict[str, Any], after: float) -> str | None:
        """What was seen if `target` holds in `status` (written after the kill at `after`)."""
        steps = _steps(status)
        record = steps.get(target.step)
        state = record["state"] if record else None
        fresh = record is not None and _written_after(record, after)
        if target.when is not None:
            return target.when(status, after) if fresh and state == "Running" else None
        if fresh and state in REACHED:
            return ""
        # Finished before the latest kill (its check holds or its phase is over), and the
        # restarted operator is already past it.
        if state in FINISHED and _later_fresh(steps, target.step, after):
            return "finished before the previous kill"
        return None

    def gone(self, target: Target, status: dict[str, Any]) -> bool:
        """`target` can no longer be seen: the recovery completed, or the step (for a
        mid-step target) finished or was passed."""
        if _conditions(status).get("Succeeded") == "True":
            return True
        if target.when is None:
            return False
        steps = _steps(status)
        record = steps.get(target.step)
        if (
            record is not None
            and _written_after(record, self.after)
            and record["state"] in FINISHED
        ):
            return True
        return _later_fresh(steps, target.step, self.after)

    def wait_for(self, target: Target, later: list[Target]) -> tuple[dict[str, Any], str] | None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            status = self.observe()
            if self.gone(target, status):
                return None  # for a boundary: a kill now would be after the recovery
            detail = self.holds(target, status, self.after)
            if detail is not None and not self.guarded(later, status):
                return status, detail
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{target.name} not seen in {STEP_TIMEOUT} s; phase "
                    f"{status.get('phase')}, steps {_step_list(status)}\n"
                    f"log tail:\n{self.op.log_tail()}"
                )
            time.sleep(OBSERVE_INTERVAL)

    def run(self, targets: list[Target]) -> None:
        for index, target in enumerate(targets):
            if target.name in self.covered:
                continue
            found = self.wait_for(target, targets[index + 1 :])
            if found is None:
                self.missed.append(target.name)
                continue
            status, detail = found
            point = self.kill(target, status, detail)
            if point.late:
                self.missed.append(target.name)
            else:
                self.covered[target.name] = point
                for later in targets[index + 1 :]:
                    if later.name not in self.covered and (
                        why := self.covers(later, status, point)
                    ):
                        self.covered[later.name] = point
                        point.also.append(f"{later.name} ({why})")
            self.after = point.killed_second

    def guarded(self, later: list[Target], status: dict[str, Any]) -> bool:
        """Hold a kill while the phase of a pending guarded target runs and that target does
        not hold yet: its job on a VM goes on while the operator restarts, so a kill for an
        earlier target now could let it finish unseen. The kill then comes when the guarded
        target holds, and covers both."""
        phase = PHASE_INDEX.get(str(status.get("phase")), -1)
        return any(
            t.guard
            and t.name not in self.covered
            and STEP_PHASE_INDEX[t.step] == phase
            and not self.gone(t, status)
            and self.holds(t, status, self.after) is None
            for t in later
        )

    def covers(self, later: Target, sighted: dict[str, Any], point: KillPoint) -> str | None:
        """Why the kill just made is also a kill point of `later` (dedupe), or None.

        A mid-step target holds in the same sighted status (e.g. the restore was seen running
        while a boundary before it was waited for); or a boundary whose step had finished at
        the kill in a phase that was over (it never runs again, so no later kill can see it
        any other way)."""
        if later.when is not None:
            detail = self.holds(later, sighted, self.after)
            return f"seen in the same status: {detail}" if detail else None
        at_kill = point.status_at_kill
        record = _steps(at_kill).get(later.step)
        phase = PHASE_INDEX.get(str(at_kill.get("phase")), -1)
        if (
            record is not None
            and record["state"] in FINISHED
            and (STEP_PHASE_INDEX[later.step] < phase)
        ):
            return f"{record['state']} at the kill, {PLAN[STEP_PHASE_INDEX[later.step]][0]} over"
        return None

    def kill(self, target: Target, status: dict[str, Any], detail: str) -> KillPoint:
        seen = time.monotonic()
        self.op.process.kill()
        killed = time.monotonic()
        # What the API holds after the kill (the operator may have written once more between
        # the sighting and the kill).
        at_kill = self.op.status()
        point = KillPoint(
            target.name,
            target.step,
            str(status.get("phase")),
            _steps(status)[target.step]["state"],
            detail,
            late=_conditions(at_kill).get("Succeeded") == "True",
            killed_second=float(int(time.time())),
            killed_at=killed,
            kill_lag=killed - seen,
            status_at_kill=at_kill,
        )
        self.points.append(point)
        self.op.process.start()
        return point


# ---------------------------------------------------------------------- the test


def _line(point: KillPoint) -> str:
    after = (
        f"resumed, past it {point.resumed_after:.1f} s after the kill"
        if point.resumed_after is not None
        else "NOT resumed"
    )
    late = " (the recovery had completed by the kill)" if point.late else ""
    lag = f"killed {point.kill_lag:.2f} s after the sighting"
    return f"    {point.label()}{late} → {lag}; {after}\n"


def test_operator_killed_at_every_step_and_inside_long_steps_completes(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server, slow_s3: FaultProxy
) -> None:
    started = time.monotonic()
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=ROWS, part_size=PART_SIZE)
    manifest = scenario.manifest(NAME, NAMESPACE)
    manifest["spec"]["source"]["s3"]["endpoint"] = slow_s3.url_for(moto_s3.endpoint_url)
    # One re-clone at a time, so "one standby done, the other cloning" is a point to kill at.
    manifest["spec"]["parallelism"] = {"standbyReclones": 1}
    walk_started = time.monotonic()
    operator.apply(*scenario.kube_secrets(NAMESPACE), manifest)

    walk = Walk(operator)
    walk.run(TARGETS)
    deadline = time.monotonic() + 300
    while _conditions(status := walk.observe()).get("Succeeded") != "True":
        assert time.monotonic() < deadline, f"not Succeeded: {status}\n{operator.log_tail()}"
        time.sleep(OBSERVE_INTERVAL)
    walk_seconds = time.monotonic() - walk_started

    # One more kill after completion: the restarted operator must not run anything again.
    operator.process.kill()
    operator.process.start()
    time.sleep(4 * float(POLL_INTERVAL) + 2)
    again = operator.status()
    rerun = again != status

    tried = len(walk.points)
    recovered = sum(p.resumed_after is not None for p in walk.points)
    boundaries = [t for t in TARGETS if t.kind == "boundary" and t.name in walk.covered]
    mids = [t for t in TARGETS if t.kind == "mid" and t.name in walk.covered]
    facts = status.get("facts", {})
    events = operator.events()
    failed_steps = [e["message"] for e in events if e["reason"] == "StepFailed"]
    retries = {k: v for k, v in facts.items() if k.startswith("retries")}
    problems = log_problems(operator.process.log_text())
    report = (
        f"kill walk: {tried} kill points tried, {recovered} recovered; they cover "
        f"{len(boundaries)} of the plan's {len(PLAN_STEPS)} step boundaries and {len(mids)} of "
        f"{sum(t.kind == 'mid' for t in TARGETS)} points inside long steps; Succeeded "
        f"{walk_seconds:.0f} s after kubectl apply (status written every {POLL_INTERVAL} s, "
        f"read every {OBSERVE_INTERVAL} s; a step's state is as seen, the operator may have "
        "been up to one status write further at the kill)\n"
        + "".join(map(_line, walk.points))
        + f"  not caught (finished unseen): {', '.join(walk.missed) or 'none'}\n"
        f"  after completion: one more kill and restart "
        f"{'CHANGED the status' if rerun else 'changed nothing'}\n"
        f"  stage-dump: {facts.get('stagedBytes')}\n"
        f"  restore: {facts.get('restoreMode')}; {facts.get('restoreReport')}\n"
        f"  StepFailed events: {failed_steps or 'none'}; phase retries: {retries or 'none'}; "
        f"operator log warnings/errors: {problems[:5] or 'none'}"
    )
    print("\n" + report)

    # Every kill was recovered from, and the recovery as a whole is right.
    assert tried == recovered, report
    assert not rerun, f"{report}\nbefore: {status}\nafter: {again}"
    assert status["phase"] == "Rejoined", report
    steps = _steps(status)
    assert sorted(steps) == sorted(PLAN_STEPS), f"the plan changed: {list(steps)}\n{report}"
    assert all(s["state"] in FINISHED for s in steps.values()), report
    assert _conditions(status).get("Stalled") == "False", report
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256, report
    restored = scenario.restored_everywhere()
    assert restored == {vm.name: True for vm in healthy_sim_cluster.vms}, f"{restored}\n{report}"
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok, report

    # Coverage: every long step was killed inside; every step boundary was a kill point
    # except, at most, the plan's last steps, which together take less than one status write
    # and end the recovery (no restart re-runs them afterwards, so they may pass unseen).
    assert len(mids) == sum(t.kind == "mid" for t in TARGETS), report
    uncaught = set(PLAN_STEPS) - {t.step for t in boundaries}
    assert uncaught <= set(MAY_PASS_UNSEEN), report
    assert set(walk.missed) <= {f"boundary {step}" for step in MAY_PASS_UNSEEN}, report
    # The kills inside the stream resumed it: parts kept on the work volume were reused and
    # the upload continued at the byte the primary already had.
    assert "kept 0," not in facts["stagedBytes"], report
    assert "resumed at" in facts["stagedBytes"], report
    # A kill is not a failure: no step failed and nothing was retried because of one.
    assert not failed_steps, report
    assert not retries, report
    assert not problems, report

    texts = {
        "status": yaml.safe_dump(again),
        "events": yaml.safe_dump(events),
        "operator log": operator.process.log_text(),
    }
    for secret in scenario.secret_strings():
        for where, text in texts.items():
            assert secret not in text, f"a secret value appears in the {where}"
    print(f"test total {time.monotonic() - started:.0f} s (scenario and backup included)")
