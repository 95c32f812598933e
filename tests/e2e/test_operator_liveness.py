"""The liveness probe of a real operator: `/healthz` fails while the event loop is blocked.

A real `kopf run` (tests/e2e/freezable_operator.py: pgrecovery.main plus a SIGUSR1 handler that
blocks the loop with `time.sleep`) against the API emulator. While the loop is blocked, `/healthz`
answers 503 with the reason (the metrics thread still serves, so the probe sees a failure, not
a timeout) once the heartbeat is older than `LOOP_STALL_AFTER`; `/metrics` keeps answering.
When the loop runs again the probe recovers by design (the kubelet restarts the pod only after
`failureThreshold` failures in a row), and the operator still works: a recovery applied after
the freeze goes through every phase. The dead-watch half of the verdict (running phases no
longer polled) is unit-tested in tests/unit/test_liveness.py.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pgrecovery.liveness import LOOP_STALL_AFTER
from tests.e2e.operator_harness import CRD, free_port, install_chart
from tests.e2e.test_operator_machinery import World
from tests.kubeapi.harness import KopfProcess, Kubectl
from tests.realkube.server import RealKubeAPI

pytestmark = pytest.mark.e2e

FREEZE_SECONDS = LOOP_STALL_AFTER + 8


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_health(port: int, code: int, timeout: float) -> str:
    """The body of /healthz once it answers `code`."""
    start = time.monotonic()
    while True:
        got, body = _get(port, "/healthz")
        if got == code:
            return body
        assert time.monotonic() - start < timeout, f"/healthz still {got} {body!r}"
        time.sleep(0.25)


def test_healthz_fails_while_the_event_loop_is_blocked_and_recovers_after(
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    real_namespace: str,
    tmp_path: Path,
) -> None:
    kube_api, kubectl = real_kube_api, real_kubectl
    kube_api.install_crd(CRD)
    _, kubeconfig, user = install_chart(kube_api, kubectl, real_namespace)
    port = free_port()
    work = tmp_path / "work"
    operator = real_kopf_operator(
        "tests.e2e.freezable_operator",
        kubeconfig=kubeconfig,
        user=user,
        env={
            "PGRECOVERY_PLAN_FACTORY": "tests.e2e.plan_for_tests:build_plan",
            "PGRECOVERY_WORK_DIR": str(work),
            "PGRECOVERY_METRICS_PORT": str(port),
            "PGRECOVERY_POLL_INTERVAL": "0.5",
            "PGRECOVERY_GATE_RECHECK": "0.5",
            "PGRECOVERY_TEST_STEP_SECONDS": "0.2",
            "PGRECOVERY_TEST_FREEZE_SECONDS": str(FREEZE_SECONDS),
        },
        watching=("pgrecoveries",),
    )
    _wait_health(port, 200, 30)
    assert _get(port, "/healthz") == (200, "ok\n")

    assert operator.pid is not None
    os.kill(operator.pid, signal.SIGUSR1)
    frozen_at = time.monotonic()
    failing = _wait_health(port, 503, LOOP_STALL_AFTER + 5)
    assert "event loop blocked" in failing, failing
    failed_after = time.monotonic() - frozen_at
    # Not before the limit (a short hiccup is no fault), soon after it.
    assert LOOP_STALL_AFTER - 1 <= failed_after <= LOOP_STALL_AFTER + 3, failed_after
    # The metrics thread still answers while the loop is blocked.
    code, text = _get(port, "/metrics")
    assert code == 200
    assert "pgrecovery_failures_total" in text
    assert operator.running

    # The loop runs again: the probe recovers, and the operator still handles PgRecoveries.
    assert _wait_health(port, 200, FREEZE_SECONDS + 10) == "ok\n"
    recovered_after = time.monotonic() - frozen_at
    assert recovered_after >= FREEZE_SECONDS - 1, recovered_after
    world = World(kube_api, kubectl, operator, work, real_namespace)
    assert kubectl.apply(world.manifest("after-freeze")).returncode == 0
    world.wait_condition("after-freeze", "Succeeded")
    print(f"/healthz: 503 {failed_after:.1f}s after the loop froze ({failing.strip()!r}), "
          f"200 again {recovered_after:.1f}s after (freeze {FREEZE_SECONDS:.0f}s)")
