"""Least-privilege RBAC, enforced by a real API server and checked against what was sent.

Why this module exists: RBAC written by reading code is either too broad or breaks the first
recovery in a real cluster. Here the chart (rendered by Helm's library for the test's own
namespace) is applied to the real kube-apiserver (tests/realkube, `--authorization-mode=RBAC`)
and a real `kopf run -m pgrecovery.main` subprocess (test-only plan) runs under the chart's
ServiceAccount token through a whole recovery and the deletion of a running one: a call the
chart does not allow fails the recovery with a 403. Every request of that ServiceAccount is
read back from the server's audit log (kubectl's requests, as `admin`, are not its), and each
must also be granted by the chart's cluster-scope rules and by `manifests/`. The reverse holds
too: every granted (verb, resource) was used, so nothing is broader than needed (no `*`, no
Secret list/watch, Events create only).

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
from tests.e2e.operator_harness import install_chart
from tests.e2e.test_operator_machinery import manifest
from tests.kubeapi.harness import KopfProcess, Kubectl, wait_for
from tests.realkube.server import RealKubeAPI
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


def _in_namespace(docs: Iterable[dict[str, Any]], namespace: str) -> str:
    moved = []
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        moved.append(doc)
    return yaml.safe_dump_all(moved)


def _recover_and_delete(kubectl: Kubectl, operator: KopfProcess, namespace: str) -> None:
    """A whole recovery to Rejoined, then a second one deleted while it runs."""
    secrets = yaml.safe_load_all((ROOT / "manifests/samples/secrets.yaml").read_text())
    assert kubectl.apply(_in_namespace(secrets, namespace)).returncode == 0
    assert kubectl.apply(manifest("whole", namespace=namespace)).returncode == 0
    done = kubectl.wait("pgr/whole", "-n", namespace, "--for=condition=Succeeded", "--timeout=90s")
    assert done.returncode == 0, done.stderr + operator.log_text()[-3000:]
    doomed = manifest("doomed", deployment="slow-decrypt", namespace=namespace)
    assert kubectl.apply(doomed).returncode == 0
    wait_for(
        lambda: "decrypting-2" in (operator.log_text() + _applies(operator, "doomed", namespace)),
        timeout=60,
        message="the slow step of the doomed recovery to start",
    )
    deleted = kubectl("delete", "pgr", "doomed", "-n", namespace, "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    # kopf posts Events from a background queue: the Deleted one may land just after the
    # object is gone.
    wait_for(
        lambda: any(
            e["reason"] == "Deleted" for e in kubectl.json("events", "-n", namespace)["items"]
        )
        or None,
        timeout=30,
        message="the Deleted event",
    )
    operator.stop()


def _applies(operator: KopfProcess, name: str, namespace: str) -> str:
    path = Path(operator.env["PGRECOVERY_WORK_DIR"]) / namespace / name / "applies.log"
    return path.read_text() if path.exists() else ""


def recorded(api: RealKubeAPI, user: str, namespace: str) -> set[Request]:
    """What `user` sent, from the audit log; the test's `namespace` is written as NAMESPACE,
    the one the rules under test are rendered for."""
    requests = set()
    for record in api.records(user=user):
        if record.group is None or record.resource is None:
            continue  # discovery: granted to everyone by system:discovery
        where = NAMESPACE if record.namespace == namespace else record.namespace
        requests.add((record.verb, record.group, record.resource, record.subresource, where))
    return requests


def assert_nothing_refused(api: RealKubeAPI, user: str) -> None:
    refused = [r for r in api.records(user=user) if r.status == 403]
    assert refused == [], f"the API server refused the operator: {refused}"


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
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_namespace: str,
    real_kopf_operator: Callable[..., KopfProcess],
    tmp_path: Path,
) -> None:
    real_kube_api.install_crd(ROOT / "crds" / "pgrecovery.yaml")
    _, kubeconfig, user = install_chart(real_kube_api, real_kubectl, real_namespace)
    operator = real_kopf_operator(
        "pgrecovery.main",
        kubeconfig=kubeconfig,
        user=user,
        env=_env(tmp_path / "work"),
        watching=("pgrecoveries",),
    )
    _recover_and_delete(real_kubectl, operator, real_namespace)
    assert_nothing_refused(real_kube_api, user)
    requests = recorded(real_kube_api, user, real_namespace)
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
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_namespace: str,
    tmp_path: Path,
) -> None:
    values = chart.COMBINATIONS["ha-pvc"]
    rendered = chart.render(values)  # for NAMESPACE: the rules under test
    real_kube_api.install_crd(ROOT / "crds" / "pgrecovery.yaml")
    crds = real_kubectl("apply", "-f", str(chart.CHART / "crds" / "kopf-peering.yaml"))
    assert crds.returncode == 0, crds.stderr
    # the chart's KopfPeering object is created by the install, in the test's namespace
    installed, kubeconfig, user = install_chart(
        real_kube_api, real_kubectl, real_namespace, values
    )
    (peering,) = chart.of_kind(installed, "KopfPeering")
    operator = PeeringKopfProcess(
        real_kube_api,
        "pgrecovery.main",
        namespace=real_namespace,
        user=user,
        kubeconfig=kubeconfig,
        log_path=tmp_path / "kopf-peer.log",
        env=_env(tmp_path / "work"),
        watching=("pgrecoveries",),
    )
    operator.peering = peering["metadata"]["name"]
    assert f"--peering={peering['metadata']['name']}" in operator.command
    try:
        operator.start()
        _recover_and_delete(real_kubectl, operator, real_namespace)
    finally:
        operator.stop()
    assert_nothing_refused(real_kube_api, user)
    requests = recorded(real_kube_api, user, real_namespace)
    assert any(r[2] == "kopfpeerings" for r in requests), sorted(requests)
    assert_least_privilege(_rules_of(rendered), requests, "the chart (HA, namespace scope)")
