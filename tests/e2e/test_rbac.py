"""Least-privilege RBAC, checked against what a real operator run actually sends.

Why this module exists: RBAC written by reading code is either too broad or breaks the first
recovery in a real cluster. Here a real `kopf run -m pgrecovery.main` subprocess (test-only
plan) goes through a whole recovery and the deletion of a running one; every request its own
user sent to the API emulator is recorded (kubectl's requests, as `admin`, are not), and each
must be granted by the chart's rendered rules (namespace and cluster scope) and by
`manifests/`. The reverse holds too: every granted (verb, resource) was used, so nothing is
broader than needed (no `*`, no Secret list/watch, Events create only).

Secrets: the test plan reads none, so the plan here wraps it and reads every Secret the spec
references through the operator's own adapter (`pgrecovery.adapters.kube`, `get` by name,
exactly what the real plan does in Fetching) before delegating. Discovery (`/api`, `/apis/…`)
is granted to every authenticated user by Kubernetes' default `system:discovery` role and is
left out. A second test runs two-replica style with `--peering` to record kopf's peering
requests against the chart's HA rules.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.engine.plan import Plan, PlanInputs
from tests.e2e import plan_for_tests
from tests.e2e.test_operator_machinery import manifest
from tests.kubeapi.harness import KopfProcess, KubeAPI, Kubectl, wait_for
from tests.unit import test_helm_chart as chart

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "pgrecovery"  # the chart's test release namespace and the manifests' namespace
Request = tuple[str, str, str, str | None, str | None]  # verb, group, resource, sub, namespace


async def build_plan_reading_secrets(inputs: PlanInputs) -> Plan:
    """The test plan, after reading every referenced Secret as the real plan does."""
    spec = inputs.spec
    await inputs.secrets.get_key(spec.source.encryption.key_secret_ref)
    store = spec.source.s3 or spec.source.azure
    if store is not None and store.credentials_secret_ref is not None:
        await inputs.secrets.get_all(store.credentials_secret_ref)
    await inputs.secrets.get_key(spec.target.ssh.private_key_secret_ref)
    await inputs.secrets.get_key(spec.target.ssh.known_hosts_secret_ref)
    return await plan_for_tests.build_plan(inputs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(work: Path) -> dict[str, str]:
    return {
        "PGRECOVERY_PLAN_FACTORY": f"{__name__}:build_plan_reading_secrets",
        "PGRECOVERY_WORK_DIR": str(work),
        "PGRECOVERY_METRICS_PORT": str(_free_port()),
        "PGRECOVERY_POLL_INTERVAL": "0.5",
        "PGRECOVERY_GATE_RECHECK": "0.5",
        "PGRECOVERY_TEST_STEP_SECONDS": "0.2",
        "PGRECOVERY_TEST_SLOW_SECONDS": "8",
        # Renewed every second, so the slow recovery renews its executor Lease (update).
        "PGRECOVERY_LEASE_DURATION": "3",
    }


def _recover_and_delete(api: KubeAPI, kubectl: Kubectl, operator: KopfProcess) -> None:
    """A whole recovery to Rejoined, then a second one deleted while it runs."""
    assert kubectl.apply((ROOT / "manifests/samples/secrets.yaml").read_text()).returncode == 0
    assert kubectl.apply(manifest("whole")).returncode == 0
    done = kubectl.wait("pgr/whole", "-n", NAMESPACE, "--for=condition=Succeeded", "--timeout=90s")
    assert done.returncode == 0, done.stderr + operator.log_text()[-3000:]
    assert kubectl.apply(manifest("doomed", deployment="slow-decrypt")).returncode == 0
    wait_for(
        lambda: "decrypting-2" in (operator.log_text() + _applies(operator, "doomed")),
        timeout=60,
        message="the slow step of the doomed recovery to start",
    )
    deleted = kubectl("delete", "pgr", "doomed", "-n", NAMESPACE, "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    # kopf posts Events from a background queue: the Deleted one may land just after the
    # object is gone.
    wait_for(
        lambda: any(
            e["reason"] == "Deleted" for e in kubectl.json("events", "-n", NAMESPACE)["items"]
        )
        or None,
        timeout=30,
        message="the Deleted event",
    )
    operator.stop()


def _applies(operator: KopfProcess, name: str) -> str:
    path = Path(operator.env["PGRECOVERY_WORK_DIR"]) / NAMESPACE / name / "applies.log"
    return path.read_text() if path.exists() else ""


def recorded(api: KubeAPI, user: str) -> set[Request]:
    requests = set()
    for record in api.records(user=user):
        if record.group is None or record.resource is None:
            continue  # discovery: granted to everyone by system:discovery
        verb, group, resource, subresource, namespace = record.rbac()
        requests.add((verb, group or "", resource, subresource, namespace))
    return requests


# ---------------------------------------------------------------- the rules under test


def _rules_of(objects: Iterable[dict[str, Any]]) -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace or None for cluster-wide, rule) for each rule bound to the operator's SA."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    bound: list[tuple[str | None, dict[str, Any]]] = []
    for obj in objects:
        if obj["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        assert any(s["kind"] == "ServiceAccount" for s in obj["subjects"])
        ref = obj["roleRef"]
        where = obj["metadata"].get("namespace") if obj["kind"] == "RoleBinding" else None
        role_ns = where if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        bound.extend((where, rule) for rule in role["rules"])
    return bound


def grants(rules: list[tuple[str | None, dict[str, Any]]], request: Request) -> bool:
    verb, group, resource, subresource, namespace = request
    name = f"{resource}/{subresource}" if subresource else resource
    return any(
        (where is None or where == namespace)
        and group in rule["apiGroups"]
        and name in rule["resources"]
        and verb in rule["verbs"]
        for where, rule in rules
    )


def granted_pairs(rules: list[tuple[str | None, dict[str, Any]]]) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for _, rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used_pairs(requests: set[Request]) -> set[tuple[str, str, str]]:
    return {
        (verb, group, f"{resource}/{sub}" if sub else resource)
        for verb, group, resource, sub, _ in requests
    }


def assert_least_privilege(
    rules: list[tuple[str | None, dict[str, Any]]], requests: set[Request], what: str
) -> None:
    missing = sorted(r for r in requests if not grants(rules, r))
    assert not missing, f"{what} does not grant: {missing}"
    unused = granted_pairs(rules) - used_pairs(requests)
    assert not unused, f"{what} grants more than the operator uses: {sorted(unused)}"
    for _, rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule
        if "events" in rule["resources"]:
            assert set(rule["verbs"]) <= {"create", "patch"}, rule


# ---------------------------------------------------------------- tests


def test_standalone_operator_is_granted_exactly_what_it_uses(
    kube_api: KubeAPI,
    kubectl: Kubectl,
    kopf_operator_subprocess: Callable[..., KopfProcess],
    tmp_path: Path,
) -> None:
    kube_api.create_namespace(NAMESPACE)
    kube_api.install_crd(ROOT / "crds" / "pgrecovery.yaml")
    operator = kopf_operator_subprocess(
        "pgrecovery.main",
        namespace=NAMESPACE,
        env=_env(tmp_path / "work"),
        watching=("pgrecoveries",),
    )
    _recover_and_delete(kube_api, kubectl, operator)
    requests = recorded(kube_api, operator.user)
    # the request kinds this test exists for really happened
    assert ("get", "", "secrets", None, NAMESPACE) in requests
    assert ("patch", "pgrecovery.dev", "pgrecoveries", "status", NAMESPACE) in requests
    assert ("create", "", "events", None, NAMESPACE) in requests
    assert ("update", "coordination.k8s.io", "leases", None, NAMESPACE) in requests
    assert not any(r[2] == "secrets" and r[0] != "get" for r in requests)

    assert_least_privilege(_rules_of(chart.render()), requests, "the chart (namespace scope)")
    cluster = chart.render({"rbac": {"scope": "cluster"}})
    assert_least_privilege(_rules_of(cluster), requests, "the chart (cluster scope)")
    from tests.unit.test_manifests import kustomize_build  # noqa: PLC0415 - runs kubectl

    assert_least_privilege(_rules_of(kustomize_build()), requests, "manifests/")
    # namespace scope: nothing is granted outside the served namespace except kopf's
    # read-only observation of namespaces and CRDs
    for where, rule in _rules_of(chart.render()):
        if where is None:
            assert set(rule["verbs"]) == {"list", "watch"}, rule
            assert rule["resources"] in (["namespaces"], ["customresourcedefinitions"]), rule


class PeeringKopfProcess(KopfProcess):
    """`kopf run … --peering NAME` (what the chart runs with replicaCount > 1)."""

    peering = "pgrecovery-operator"

    @property
    def command(self) -> list[str]:
        return [
            arg if arg != "--standalone" else f"--peering={self.peering}" for arg in super().command
        ]


def test_ha_operator_with_peering_is_granted_exactly_what_it_uses(
    kube_api: KubeAPI,
    kubectl: Kubectl,
    tmp_path: Path,
) -> None:
    values = chart.COMBINATIONS["ha-pvc"]
    rendered = chart.render(values)
    kube_api.create_namespace(NAMESPACE)
    kube_api.install_crd(ROOT / "crds" / "pgrecovery.yaml")
    peering_crds = yaml.safe_load_all((chart.CHART / "crds" / "kopf-peering.yaml").read_text())
    for crd in peering_crds:
        assert kube_api.create(crd)
    (peering,) = chart.of_kind(rendered, "KopfPeering")
    assert kube_api.create(peering)
    operator = PeeringKopfProcess(
        kube_api,
        "pgrecovery.main",
        namespace=NAMESPACE,
        user="kopf-peer",
        log_path=tmp_path / "kopf-peer.log",
        env=_env(tmp_path / "work"),
        watching=("pgrecoveries",),
    )
    assert f"--peering={peering['metadata']['name']}" in operator.command
    try:
        operator.start()
        _recover_and_delete(kube_api, kubectl, operator)
    finally:
        operator.stop()
    requests = recorded(kube_api, operator.user)
    assert any(r[2] == "kopfpeerings" for r in requests), sorted(requests)
    assert_least_privilege(_rules_of(rendered), requests, "the chart (HA, namespace scope)")
