"""The Helm chart, linted and rendered by a real Helm (helm-python-sdk: Helm's Go library).

Why this module exists: a chart is only known to work once Helm itself renders it, and every
rendered object passes the checks a real API server would make. Rendered for the default
values and three other combinations; every object goes through `kubernetes-validate --strict`
except the Prometheus Operator and kopf peering custom resources, which kubernetes-validate does
not know: their shape is checked here instead (and the PrometheusRule's rules by promtool).
Also: the chart's CRD is `crds/pgrecovery.yaml` (one source of truth), the values schema
rejects nonsense, the dashboard queries only metrics the operator exports, and the Argo CD
health check maps statuses as documented (run by a real Lua interpreter).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery import metrics
from pgrecovery.engine import status as st
from pgrecovery.engine.status import RecoveryStatus

helm = pytest.importorskip("helm_python", reason="helm-python-sdk missing: bash .ci/setup")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pgrecovery-operator"
RULE_TESTS = Path(__file__).parent / "data" / "prometheus-rules.test.yaml"
# Under CI (`CI` set) a missing promtool fails the PrometheusRule test instead of skipping it.
PROMTOOL = shutil.which("promtool") or ("promtool" if os.environ.get("CI") else None)
LUA = shutil.which("lua5.4") or shutil.which("lua5.3")
RELEASE, NAMESPACE = "pgrecovery-operator", "pgrecovery"

# name -> values; each combination changes what the templates decide.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-monitoring": {
        "rbac": {"scope": "cluster"},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusRule": {"enabled": True},
        },
    },
    "ha-pvc": {
        "replicaCount": 2,
        "workVolume": {
            "type": "persistentVolumeClaim",
            "persistentVolumeClaim": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs"},
        },
    },
    "two-namespaces-dashboard": {
        "watchNamespaces": ["team-a", "team-b"],
        "dashboard": {"enabled": True},
        "settings": {"verbose": True},
    },
    "ha-cluster": {"replicaCount": 3, "rbac": {"scope": "cluster"}},
}
# Kinds that kubernetes-validate has no schema for: their shape is checked by _check_custom.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only: Helm's render leaves out crds/)."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    rendered = helm.Chart.load(CHART).render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def kubernetes_validate(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        ["kubernetes-validate", "--strict", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(objects), result.stdout


def _check_custom(obj: dict[str, Any]) -> None:
    """The shape of the custom resources kubernetes-validate cannot know."""
    kind, spec = obj["kind"], obj.get("spec", {})
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, obj
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    if kind in ("ServiceMonitor", "PrometheusRule"):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["namespace"] == NAMESPACE
    if kind == "ServiceMonitor":
        assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        assert set(spec["selector"]["matchLabels"].items()) <= set(
            {
                "app.kubernetes.io/name": "pgrecovery-operator",
                "app.kubernetes.io/instance": RELEASE,
            }.items()
        )
    if kind == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules"}
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
    if kind in ("KopfPeering", "ClusterKopfPeering"):
        assert obj["apiVersion"] == "kopf.dev/v1"
        assert spec == {}
        assert ("namespace" in obj["metadata"]) == (kind == "KopfPeering")


# ---------------------------------------------------------------- lint, schema, CRDs


def test_chart_lints_strictly_for_every_combination() -> None:
    for name, values in COMBINATIONS.items():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, (name, report)
        assert not report["errors"], (name, report)


def test_values_schema_rejects_nonsense() -> None:
    chart = helm.Chart.load(CHART)
    chart.validate_schema({})
    for bad in (
        {"rbac": {"scope": "everything"}},
        {"replicaCount": 0},
        {"workVolume": {"type": "hostPath"}},
        {"watchNamespaces": ["Not_A_Name"]},
        {"settings": {"pollInterval": 0}},
        {"unknownKey": True},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)


def test_chart_crd_is_the_one_in_crds() -> None:
    chart_crds = {
        c["filename"] if "filename" in c else c["name"]: c["data"]
        for c in helm.Chart.load(CHART).crds
    }
    ours = [data for name, data in chart_crds.items() if name.endswith("pgrecovery.yaml")]
    assert ours == [(ROOT / "crds" / "pgrecovery.yaml").read_text()], sorted(chart_crds)


def test_chart_crds_pass_kubernetes_validate(tmp_path: Path) -> None:
    docs = [doc for c in helm.Chart.load(CHART).crds for doc in yaml.safe_load_all(c["data"])]
    assert {d["metadata"]["name"] for d in docs} == {
        "pgrecoveries.pgrecovery.dev",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    kubernetes_validate(docs, tmp_path)


# ---------------------------------------------------------------- rendered objects


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_rendered_objects_are_valid(combination: str, tmp_path: Path) -> None:
    objects = render(COMBINATIONS[combination])
    standard = [obj for obj in objects if obj["kind"] not in CUSTOM_KINDS]
    kubernetes_validate(standard, tmp_path)
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            _check_custom(obj)
    names = [
        (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in objects
    ]
    assert len(names) == len(set(names)), names


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_default_deployment_is_hardened_standalone_and_namespaced() -> None:
    objects = render()
    (deployment,) = of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["command"] == ["kopf"]
    assert container["args"] == [
        "run",
        "-m",
        "pgrecovery.main",
        f"--namespace={NAMESPACE}",
        "--standalone",
    ]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert set(container["resources"]) == {"requests", "limits"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    env = _env(container)
    assert env["PGRECOVERY_METRICS_PORT"] == "8080"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"work": env["PGRECOVERY_WORK_DIR"], "tmp": "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"]["emptyDir"]["sizeLimit"] == "20Gi"
    assert "sizeLimit" in volumes["tmp"]["emptyDir"]
    assert not of_kind(objects, "PersistentVolumeClaim")
    assert not of_kind(objects, "KopfPeering")
    (role,) = of_kind(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert [c["metadata"]["name"] for c in of_kind(objects, "ClusterRole")] == [
        "pgrecovery-operator-observer"
    ]
    (service,) = of_kind(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_cluster_scope_runs_all_namespaces_with_monitoring_objects() -> None:
    objects = render(COMBINATIONS["cluster-monitoring"])
    assert "--all-namespaces" in _container(objects)["args"]
    assert not of_kind(objects, "Role")
    assert len(of_kind(objects, "ClusterRole")) == 2
    assert len(of_kind(objects, "ServiceMonitor")) == 1
    (rule,) = of_kind(objects, "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == source  # exactly the unit-tested file
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "pgrecovery-operator"


def test_ha_uses_peering_and_a_pvc() -> None:
    objects = render(COMBINATIONS["ha-pvc"])
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = _container(objects)
    assert "--standalone" not in container["args"]
    assert "--peering=pgrecovery-operator" in container["args"]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert "--priority" in container["command"][2]
    (peering,) = of_kind(objects, "KopfPeering")
    assert peering["metadata"] == {
        **peering["metadata"],
        "name": "pgrecovery-operator",
        "namespace": NAMESPACE,
    }
    (pvc,) = of_kind(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["work"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (role,) = of_kind(objects, "Role")
    assert {
        "apiGroups": ["kopf.dev"],
        "resources": ["kopfpeerings"],
        "verbs": ["list", "watch", "patch"],
    } in role["rules"]
    assert "only ONE replica is active" in notes(COMBINATIONS["ha-pvc"])


def test_ha_cluster_wide_uses_a_cluster_peering() -> None:
    objects = render(COMBINATIONS["ha-cluster"])
    (peering,) = of_kind(objects, "ClusterKopfPeering")
    assert "--peering=pgrecovery-operator" in _container(objects)["args"]
    assert "--all-namespaces" in _container(objects)["args"]
    assert peering["metadata"]["name"] == "pgrecovery-operator"


def test_two_watched_namespaces_get_a_role_each_and_the_dashboard() -> None:
    objects = render(COMBINATIONS["two-namespaces-dashboard"])
    args = _container(objects)["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args
    assert "--verbose" in args
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == [
        "team-a",
        "team-b",
    ]
    bindings = of_kind(objects, "RoleBinding")
    assert {b["subjects"][0]["namespace"] for b in bindings} == {NAMESPACE}
    (dashboard,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["pgrecovery.json"]) == shipped


# ---------------------------------------------------------------- PrometheusRule by promtool

requires_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: .ci/setup")


@requires_promtool
def test_rendered_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    (rule,) = of_kind(render(COMBINATIONS["cluster-monitoring"]), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run(
        [str(PROMTOOL), "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    shutil.copy(RULE_TESTS, tmp_path / "tests.yaml")  # it names rule_files: [rules.yaml]
    test = subprocess.run(
        [str(PROMTOOL), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_prometheus_rule_runbooks_follow_runbook_base_url_and_jobs_match_the_service() -> None:
    mirror = "https://git.example.org/ops/pgrecovery/-/blob/v1/README.md"
    values = {"metrics": {"serviceMonitor": {"enabled": True},
                          "prometheusRule": {"enabled": True, "runbookBaseUrl": mirror}}}
    objects = render(values)
    (rule,) = of_kind(objects, "PrometheusRule")
    rules = rule["spec"]["groups"][0]["rules"]
    assert {r["annotations"]["runbook_url"] for r in rules} == {
        f"{mirror}#alert-{r['alert'].lower()}" for r in rules
    }
    # Prometheus Operator names a ServiceMonitor's job after the Service it selects: the
    # operator-down alerts match it by `job=~".*pgrecovery.*"`.
    (service,) = of_kind(objects, "Service")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    assert re.fullmatch(r".*pgrecovery.*", service["metadata"]["name"])
    down = {r["alert"]: r["expr"] for r in rules}
    assert 'job=~".*pgrecovery.*"' in down["PgRecoveryOperatorDown"]
    assert 'job=~".*pgrecovery.*"' in down["PgRecoveryOperatorAbsent"]


# ---------------------------------------------------------------- dashboard

METRIC = re.compile(r"\bpgrecovery_[a-z_]+\b")


def _exported_metric_names() -> set[str]:
    now = st.now_utc()
    status = st.record_progress(st.accept(RecoveryStatus(), {}, 1, now), 10, 100, now, "parts")
    metrics.record_progress("ns/dashboard", status)
    metrics.record_phase_duration("Fetching", 3.0)
    metrics.record_bytes("fetched", 10)
    metrics.record_step_event("Fetching", "StepStarted")
    metrics.record_result("ns/dashboard-failed", "failed", "WrongKey")
    try:
        text = metrics.exposition().decode()
    finally:
        metrics.forget("ns/dashboard")
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    exported = _exported_metric_names()
    assert used, exprs
    assert used <= exported, sorted(used - exported)
    # every metric family of the operator is on the dashboard somewhere
    suffix = re.compile(r"_(bucket|count|sum)$")
    families = {suffix.sub("", name) for name in exported if not name.endswith("_created")}
    shown = {suffix.sub("", name) for name in used}
    assert families <= shown, sorted(families - shown)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- Argo CD health (Lua)

requires_lua = pytest.mark.skipif(LUA is None, reason="lua5.4 missing: .ci/setup")


def _lua_literal(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def argocd_health(obj: dict[str, Any], tmp_path: Path) -> tuple[str, str]:
    script = CHART / "files" / "argocd-health.lua"
    runner = tmp_path / "run.lua"
    runner.write_text(
        f"obj = {_lua_literal(obj)}\n"
        f"local hs = assert(loadfile({json.dumps(str(script))}))()\n"
        "io.write(hs.status, '\\n', hs.message or '')\n"
    )
    result = subprocess.run([str(LUA), str(runner)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.partition("\n")
    return status, message


def _cond(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


@requires_lua
@pytest.mark.parametrize(
    ("status", "health", "words"),
    [
        (None, "Progressing", "Waiting"),
        (
            {
                "phase": "Fetching",
                "message": "parts 3/12",
                "conditions": [_cond("Progressing", "True"), _cond("Stalled", "False")],
            },
            "Progressing",
            "Fetching: parts 3/12",
        ),
        (
            {"phase": "Decrypting", "conditions": [_cond("Stalled", "True")]},
            "Progressing",
            "STALLED",
        ),
        (
            {
                "phase": "Staging",
                "conditions": [
                    _cond("Blocked", "True", "AwaitingConfirmation", "set spec.confirm to a9s-pg")
                ],
            },
            "Suspended",
            "spec.confirm",
        ),
        (
            {
                "phase": "Staging",
                "conditions": [
                    _cond("Blocked", "True", "DeploymentBusy", "pgrecovery/first holds a9s-pg")
                ],
            },
            "Progressing",
            "DeploymentBusy",
        ),
        (
            {
                "phase": "Decrypting",
                "message": "every check passed",
                "conditions": [_cond("Blocked", "True", "DryRunComplete")],
            },
            "Healthy",
            "Dry run complete",
        ),
        (
            {
                "phase": "Failed",
                "failureReason": "WrongKey",
                "message": "the key does not fit",
                "conditions": [_cond("Failed", "True", "WrongKey")],
            },
            "Degraded",
            "WrongKey",
        ),
        (
            {
                "phase": "Rejoined",
                "conditions": [_cond("Succeeded", "True"), _cond("Blocked", "False")],
            },
            "Healthy",
            "",
        ),
    ],
)
def test_argocd_health_check(
    status: dict[str, Any] | None, health: str, words: str, tmp_path: Path
) -> None:
    obj: dict[str, Any] = {
        "apiVersion": "pgrecovery.dev/v1alpha1",
        "kind": "PgRecovery",
        "metadata": {"name": "x"},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    got_status, message = argocd_health(obj, tmp_path)
    assert got_status == health, message
    assert words in message
