"""The CRD, the chart's RBAC and the operator against a real kube-apiserver (tests/realkube).

Why this module exists: the emulator accepts any object, evaluates no CEL, prunes nothing and
enforces no RBAC, so what a real cluster would reject stayed untested. Here the real server
(built by .ci/build-kube.sh) decides:

- `kubectl apply -f crds/` is accepted (structural schema, CEL rules within the cost budget);
- every invalid sample of the offline CRD tests is rejected by the server, each CEL rule with
  its own message, in kubectl's output;
- a status with every field the operator writes comes back unchanged (nothing pruned);
- the Helm chart rendered by Helm's library is applied, and the real operator (`kopf run -m
  pgrecovery.main`, test-only plan) runs under the chart's ServiceAccount token with RBAC
  enforced: a recovery to Succeeded through `kubectl wait`, `kubectl get pgr` printer columns,
  Events, the finalizer, deletion of a finished and of a running recovery; no request of the
  operator was refused (the audit log has no 403 for it).
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.engine.phases import Phase
from pgrecovery.engine.status import (
    BackupInfo,
    Condition,
    ConditionType,
    NodeState,
    Progress,
    RecoveryStatus,
    RestoreProof,
    StepRecord,
    StepState,
)
from tests.e2e.operator_harness import free_port
from tests.kubeapi.harness import KopfProcess, Kubectl, log_problems, wait_for
from tests.realkube.server import RealKubeAPI
from tests.unit import test_crd, test_dingo_spec
from tests.unit import test_helm_chart as chart_values

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "pgrecovery.yaml"
CHART = ROOT / "helm" / "pgrecovery-operator"
GROUP_PATH = "/apis/pgrecovery.dev/v1alpha1"


@pytest.fixture
def crd(real_kube_api: RealKubeAPI) -> None:
    real_kube_api.install_crd(CRD)


def _in(namespace: str, doc: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    if name is not None:
        doc["metadata"]["name"] = name
    return doc


def _apply(kubectl: Kubectl, *docs: dict[str, Any]) -> None:
    result = kubectl.apply(yaml.safe_dump_all(docs))
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- the CRD


def test_kubectl_apply_crds_is_accepted(real_kube_api: RealKubeAPI, real_kubectl: Kubectl) -> None:
    for folder in (ROOT / "crds", ROOT / "manifests" / "crds", CHART / "crds"):
        result = real_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(folder))
        assert result.returncode == 0, f"{folder}: {result.stderr}"
        assert "Warning" not in result.stderr, result.stderr  # e.g. an unknown schema format
    name = "pgrecoveries.pgrecovery.dev"
    done = real_kubectl("wait", f"crd/{name}", "--for=condition=Established", "--timeout=30s")
    assert done.returncode == 0, done.stderr
    crd = real_kubectl.json("crd", name)
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["NamesAccepted"]["status"] == "True"
    assert conditions.get("NonStructuralSchema", {}).get("status") != "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["pgr"]
    # the server publishes the CRD's OpenAPI (what explain reads) a moment after Established
    def explain() -> subprocess.CompletedProcess[str] | None:
        result = real_kubectl("explain", "pgr.spec.confirm")
        return result if result.returncode == 0 else None

    explained = wait_for(explain, timeout=60, interval=1,
                         message="kubectl explain pgr.spec.confirm to work")
    assert "destructive" in explained.stdout.lower()


def test_every_sample_is_accepted(crd: None, real_kubectl: Kubectl, real_namespace: str) -> None:
    for sample in test_crd.SAMPLES:
        doc = _in(real_namespace, yaml.safe_load(sample.read_text()))
        result = real_kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc))
        assert result.returncode == 0, f"{sample.name}: {result.stderr}"
        assert result.stderr == "", f"{sample.name}: {result.stderr}"
    dingo = _in(real_namespace, test_dingo_spec.DINGO)
    result = real_kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(dingo))
    assert result.returncode == 0, result.stderr


def _offline_cases() -> list[tuple[str, Any]]:
    """The same invalid values the offline test rejects with jsonschema and the typed model."""
    marks = test_crd.test_invalid_values_are_rejected_by_schema_and_model.pytestmark
    cases: list[tuple[str, Any]] = next(m.args[1] for m in marks if m.name == "parametrize")
    return cases


def _server_path(path: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)


@pytest.mark.parametrize(("path", "value"), _offline_cases())
def test_invalid_values_are_rejected_by_the_server(
    crd: None, real_kubectl: Kubectl, real_namespace: str, path: str, value: Any,
) -> None:
    doc = _in(real_namespace, test_crd._mutate(path, value), name="invalid")
    result = real_kubectl.apply(yaml.safe_dump(doc))
    assert result.returncode != 0, f"the server accepted {path}={value!r}"
    assert "is invalid" in result.stderr, result.stderr
    assert _server_path(path) in result.stderr, result.stderr
    assert real_kubectl.get("pgr", "invalid").returncode != 0


def _spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]
    return spec


def _break_s3(doc: dict[str, Any]) -> None:
    del _spec_of(doc)["source"]["s3"]


def _both_stores(doc: dict[str, Any]) -> None:
    _spec_of(doc)["source"]["azure"] = {"container": "abc", "credentialsSecretRef": {"name": "x"}}


def _foreign_backup_id(doc: dict[str, Any]) -> None:
    _spec_of(doc)["source"]["backupId"] = "0e2fe9e4-6535-423d-8709-dca87df7985c-1740130000123"


def _no_encryption(doc: dict[str, Any]) -> None:
    del _spec_of(doc)["source"]["encryption"]


def _pitr_without_wale(doc: dict[str, Any]) -> None:
    _spec_of(doc)["pointInTime"] = {"targetTime": "2026-11-21T10:00:00Z"}


def _wale_from_azure(doc: dict[str, Any]) -> None:
    source = _spec_of(doc)["source"]
    source["type"] = "walE"
    source.pop("encryption")
    del source["s3"]
    source["azure"] = {"container": "abc", "credentialsSecretRef": {"name": "x"}}


def _dingo_from_a9s(doc: dict[str, Any]) -> None:
    _spec_of(doc)["source"]["type"] = "a9sLogical"
    _spec_of(doc)["source"]["encryption"] = {"keySecretRef": {"name": "k", "key": "key"}}


def _dingo_pitr(doc: dict[str, Any]) -> None:
    _spec_of(doc)["pointInTime"] = {"targetTime": "2026-11-21T10:00:00Z"}


def _dingo_same_instance(doc: dict[str, Any]) -> None:
    _spec_of(doc)["target"]["dingo"]["instanceId"] = _spec_of(doc)["source"]["backupGuid"]


def _dingo_block_on_a9s(doc: dict[str, Any]) -> None:
    _spec_of(doc)["target"]["type"] = "a9sPg"


def _bosh_and_nodes(doc: dict[str, Any]) -> None:
    _spec_of(doc)["target"]["bosh"] = {
        "director": "https://10.0.0.6:25555",
        "caCertSecretRef": {"name": "bosh-director-ca", "key": "ca.crt"},
        "credentialsSecretRef": {"name": "bosh-director"},
    }


def _no_way_to_the_vms(doc: dict[str, Any]) -> None:
    del _spec_of(doc)["target"]["ssh"]


def _a9s() -> dict[str, Any]:
    return test_crd._sample()


def _dingo() -> dict[str, Any]:
    return copy.deepcopy(test_dingo_spec.DINGO)


# one case per x-kubernetes-validations rule of the CRD: (base, change, the rule's message)
CEL_CASES: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "exactly one of s3 and azure must be set": (_a9s, _break_s3),
    "backupId must start with backupGuid": (_a9s, _foreign_backup_id),
    "a9sLogical backups are encrypted; encryption.keySecretRef is required": (_a9s, _no_encryption),
    "walE archives are read from s3 only": (_a9s, _wale_from_azure),
    "pointInTime is only valid with source.type walE": (_a9s, _pitr_without_wale),
    "target.type dingo restores a WAL-E archive; source.type must be walE": (
        _dingo, _dingo_from_a9s),
    "target.type dingo restores the whole archive; pointInTime is not supported": (
        _dingo, _dingo_pitr),
    "target.dingo.instanceId must be the new instance, not the deleted one (source.backupGuid)": (
        _dingo, _dingo_same_instance),
    "target.dingo is required with type dingo and only valid with it": (
        _dingo, _dingo_block_on_a9s),
    "give exactly one of target.nodes + target.ssh, or target.bosh (the director finds and "
    "opens the VMs)": (_a9s, _bosh_and_nodes),
}


def _cel_messages() -> list[str]:
    messages: list[str] = []

    def visit(node: dict[str, Any]) -> None:
        messages.extend(rule["message"] for rule in node.get("x-kubernetes-validations", []))
        for child in (node.get("properties") or {}).values():
            visit(child)
        if isinstance(node.get("items"), dict):
            visit(node["items"])

    visit(test_crd._schema())
    return messages


def test_every_cel_rule_has_a_case() -> None:
    assert sorted(CEL_CASES) == sorted(_cel_messages())


@pytest.mark.parametrize("message", sorted(CEL_CASES))
def test_cel_rule_rejects_with_its_message(
    crd: None, real_kubectl: Kubectl, real_namespace: str, message: str,
) -> None:
    base, change = CEL_CASES[message]
    doc = _in(real_namespace, base(), name="cel")
    change(doc)
    result = real_kubectl.apply(yaml.safe_dump(doc))
    assert result.returncode != 0, f"the server accepted an object breaking: {message}"
    assert message in result.stderr, result.stderr
    if message == "exactly one of s3 and azure must be set":  # the other way to break it
        also_both = _in(real_namespace, base(), name="cel")
        _both_stores(also_both)
        result = real_kubectl.apply(yaml.safe_dump(also_both))
        assert message in result.stderr, result.stderr
    if message.startswith("give exactly one of target.nodes"):  # nodes without ssh
        neither = _in(real_namespace, base(), name="cel")
        _no_way_to_the_vms(neither)
        result = real_kubectl.apply(yaml.safe_dump(neither))
        assert message in result.stderr, result.stderr


# ---------------------------------------------------------------------- installs


def test_plain_manifests_install_is_accepted(
    crd: None, real_kube_api: RealKubeAPI, tmp_path: Path,
) -> None:
    """`kubectl apply -k manifests/` for real (namespace pgrecovery, RBAC, Deployment, …)."""
    real_kubectl = Kubectl(kubeconfig=real_kube_api.kubeconfig, cache_dir=tmp_path / "cache")
    result = real_kubectl("apply", "-k", str(ROOT / "manifests"))
    assert result.returncode == 0, result.stderr
    for kind in ("deployment", "serviceaccount", "role", "rolebinding", "service"):
        found = real_kubectl("get", kind, "-n", "pgrecovery", "-o", "name")
        assert found.returncode == 0, (kind, found.stderr)
        assert found.stdout.strip(), kind


# Kinds whose CRDs come with the Prometheus Operator, which this server does not have.
NO_CRD_HERE = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("combination", sorted(chart_values.COMBINATIONS))
def test_every_chart_combination_is_accepted(
    crd: None, real_kube_api: RealKubeAPI, real_namespace: str, combination: str,
    tmp_path: Path,
) -> None:
    """Every values combination the chart tests render, checked by the server (dry run)."""
    # no default namespace: the chart puts objects into several (as Helm would)
    real_kubectl = Kubectl(kubeconfig=real_kube_api.kubeconfig, cache_dir=tmp_path / "cache")
    peering = real_kubectl("apply", "-f", str(CHART / "crds" / "kopf-peering.yaml"))
    assert peering.returncode == 0, peering.stderr
    values = copy.deepcopy(chart_values.COMBINATIONS[combination])
    if values.get("watchNamespaces"):
        values["watchNamespaces"] = [f"{real_namespace}-{n}" for n in values["watchNamespaces"]]
        for name in values["watchNamespaces"]:
            real_kube_api.create_namespace(name)
    objects = [o for o in _render_chart(f"pgr-{real_namespace}", real_namespace, values)
               if o["kind"] not in NO_CRD_HERE]
    result = real_kubectl("apply", "--dry-run=server", "-f", "-",
                          input=yaml.safe_dump_all(objects))
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- status round trip


def full_status(spec: dict[str, Any]) -> dict[str, Any]:
    """A status with every field of `RecoveryStatus` set, as the operator writes it."""
    t = datetime(2026, 12, 3, 9, 30, 0, tzinfo=UTC)
    ms = datetime(2026, 12, 3, 9, 30, 1, 123000, tzinfo=UTC)
    status = RecoveryStatus(
        phase=Phase.FAILED,
        conditions=tuple(
            Condition(type=kind, status="True" if kind is ConditionType.FAILED else "False",
                      reason="Reason" + kind.value, message=f"{kind.value} message",
                      last_transition_time=t, observed_generation=1)
            for kind in ConditionType
        ),
        observed_generation=1,
        started_at=t,
        completed_at=t,
        message="failed in Staging: something",
        failure_reason="Injected",
        backup=BackupInfo(id="de2fe9e4-6535-423d-8709-dca87df7985c-1740130000123", taken_at=t,
                          parts=3, size_bytes=123456789, plain_size_bytes=987654321,
                          plain_sha256="ab" * 32),
        progress=Progress(phase_bytes_done=10, phase_bytes_total=100, percent=10,
                          last_progress_at=t, detail="2 errors tolerated"),
        primary="pg/0",
        nodes=tuple(NodeState(name=f"pg/{i}", role="standby" if i else "primary",
                              monit="postgresql-ha=OK repmgr=OK", state="streaming")
                    for i in range(3)),
        steps=tuple(StepRecord(name=f"step-{i}", phase=phase, state=state, started_at=ms,
                               finished_at=ms, seconds=1.5, message=f"{state.value}")
                    for i, (phase, state) in enumerate(zip(
                        [Phase.FETCHING, Phase.DECRYPTING, Phase.STAGING, Phase.RESTORING],
                        list(StepState), strict=True))),
        facts={"failedInPhase": "Staging", "stagedFile": "/var/vcap/store/x.sql"},
        restore_proof=RestoreProof(databases=5, tables=219, rows=12_345_678_901,
                                   verified_on=("pg/0", "pg/1"), nodes=3,
                                   not_verified=("repmgr_cluster.repmgr.*: repmgr's own",),
                                   restore_lsn="0/5A000060", seconds={"pg/0": 1.5}),
        phase_started_at=ms,
        phase_durations={"Fetching": 1.25, "Decrypting": 3.0},
        accepted_spec={k: v for k, v in spec.items() if k != "confirm"},
    )
    raw = status.to_dict()
    missing = set(RecoveryStatus.model_fields) - {
        name for name, field in RecoveryStatus.model_fields.items()
        if (field.alias or name) in raw}
    assert missing == set(), f"the test's status leaves out {missing}"
    return raw


def test_status_with_every_field_survives_a_round_trip(
    crd: None, real_kube_api: RealKubeAPI, real_kubectl: Kubectl, real_namespace: str,
) -> None:
    doc = _in(real_namespace, test_crd._sample(), name="roundtrip")
    _apply(real_kubectl, doc)
    status = full_status(doc["spec"])
    path = f"{GROUP_PATH}/namespaces/{real_namespace}/pgrecoveries/roundtrip/status"
    code, answer = real_kube_api.request("PATCH", path, {"status": status},
                                         content_type="application/merge-patch+json")
    assert code == 200, answer
    stored = real_kubectl.json("pgr", "roundtrip")["status"]
    assert stored == status
    assert RecoveryStatus.from_dict(stored).to_dict() == status


# ---------------------------------------------------------------------- chart + operator


def _render_chart(release: str, namespace: str,
                  values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk missing: bash .ci/setup")
    rendered = helm.Chart.load(CHART).render(values or {}, name=release, namespace=namespace,
                                             is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def _manifest(namespace: str, name: str, deployment: str = "a9s-pg") -> dict[str, Any]:
    doc = _in(namespace, test_crd._sample(), name=name)
    doc["spec"]["target"]["deployment"] = deployment
    doc["spec"]["confirm"] = deployment
    return doc


def test_operator_under_the_charts_rbac_recovers_and_deletes(
    crd: None,
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_namespace: str,
    real_kopf_operator: Callable[..., KopfProcess],
    tmp_path: Path,
) -> None:
    ns = real_namespace
    objects = _render_chart(f"pgr-{ns}", ns)
    # the chart as Helm would install it (Deployment included: no kubelet runs it here)
    _apply(real_kubectl, *objects)
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    sa = account["metadata"]["name"]
    sa_user = f"system:serviceaccount:{ns}:{sa}"
    secrets = [_in(ns, d) for d in yaml.safe_load_all(
        (ROOT / "manifests/samples/secrets.yaml").read_text()) if d]
    _apply(real_kubectl, *secrets)

    work = tmp_path / "work"
    since = real_kube_api.mark()
    operator = real_kopf_operator(
        "pgrecovery.main",
        kubeconfig=real_kube_api.serviceaccount_kubeconfig(ns, sa),
        user=sa_user,
        env={
            "PGRECOVERY_PLAN_FACTORY": "tests.e2e.test_rbac:build_plan_reading_secrets",
            "PGRECOVERY_WORK_DIR": str(work),
            "PGRECOVERY_METRICS_PORT": str(free_port()),
            "PGRECOVERY_POLL_INTERVAL": "0.5",
            "PGRECOVERY_GATE_RECHECK": "0.5",
            "PGRECOVERY_TEST_STEP_SECONDS": "0.2",
            "PGRECOVERY_TEST_SLOW_SECONDS": "8",
        },
        watching=("pgrecoveries",),
    )

    _apply(real_kubectl, _manifest(ns, "whole"))
    done = real_kubectl.wait("pgr/whole", "--for=condition=Succeeded", "--timeout=120s")
    assert done.returncode == 0, done.stderr + operator.log_text()[-4000:]
    status = real_kubectl.json("pgr", "whole")["status"]
    assert status["phase"] == "Rejoined"
    assert [s["state"] for s in status["steps"]] == ["Succeeded"] * 10

    table = real_kubectl.get("pgr")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "BACKUP", "PROGRESS", "PRIMARY", "AGE"]
    assert row.split()[:2] == ["whole", "Rejoined"], table.stdout
    # the cells as the server computed them from the printer columns' jsonPaths
    code, cells = real_kube_api.request(
        "GET", f"{GROUP_PATH}/namespaces/{ns}/pgrecoveries/whole",
        accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert code == 200, cells
    columns = [c["name"] for c in cells["columnDefinitions"]]
    values = dict(zip(columns, cells["rows"][0]["cells"], strict=True))
    assert values["Phase"] == "Rejoined"
    assert values["Progress"] == status["progress"]["percent"], (values, status["progress"])

    events = [e for e in real_kubectl.json("events")["items"]
              if e["involvedObject"]["name"] == "whole"]
    reasons = [e["reason"] for e in events]
    for phase in ("Fetching", "Decrypting", "Staging", "Restoring", "Rejoined"):
        assert reasons.count(f"Phase{phase}") == 1, reasons
    assert reasons.count("Succeeded") == 1, reasons
    assert {e["source"].get("component") for e in events} != {None}

    obj = real_kubectl.json("pgr", "whole")
    assert "pgrecovery.dev/finalizer" in obj["metadata"]["finalizers"]

    # a running recovery deleted: the operator stops it and releases the finalizer
    _apply(real_kubectl, _manifest(ns, "doomed", deployment="slow-decrypt"))
    applies = work / ns / "doomed" / "applies.log"
    wait_for(lambda: applies.exists() and "decrypting-2" in applies.read_text(), timeout=90,
             message="the slow Decrypting step to start")
    for name in ("doomed", "whole"):
        gone = real_kubectl.delete("pgr", name, "--timeout=90s")
        assert gone.returncode == 0, gone.stderr + operator.log_text()[-4000:]
        assert real_kubectl.get("pgr", name).returncode != 0

    refused = [r for r in real_kube_api.records(since=since, user=sa_user) if r.status == 403]
    assert refused == [], refused
    assert real_kube_api.records(since=since, user=sa_user, verb="watch",
                                 resource="pgrecoveries", namespace=ns)
    assert log_problems(operator.log_text()) == []
