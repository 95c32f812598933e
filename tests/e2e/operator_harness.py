"""How the operator e2e tests start the real operator and look at what it did.

Why this module exists: six test modules started `kopf run -m pgrecovery.main` against the
API emulator the same way (namespace, CRD, the settings that keep tests short) and each carried
its own copy of that fixture body and of a small kubectl wrapper. This is the one copy; it is a
library (imported), not a fixture module, so the fixtures stay in the test modules that use
them and pass their own extra settings.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.kubeapi.harness import KopfProcess, KubeAPI, Kubectl
from tests.realkube.server import RealKubeAPI

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "pgrecovery.yaml"
NAMESPACE = "pgrecovery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_recovery_operator(
    kube_api: KubeAPI,
    kopf_operator_subprocess: Callable[..., KopfProcess],
    work_dir: Path,
    *,
    metrics_port: int,
    env: Mapping[str, str] | None = None,
) -> KopfProcess:
    """The namespace and CRD created, then the real operator with the real plans; polls and
    gate rechecks every second (the defaults are meant for hours-long recoveries)."""
    kube_api.create_namespace(NAMESPACE)
    kube_api.install_crd(CRD)
    return kopf_operator_subprocess(
        "pgrecovery.main",
        namespace=NAMESPACE,
        env={
            "PGRECOVERY_WORK_DIR": str(work_dir),
            "PGRECOVERY_METRICS_PORT": str(metrics_port),
            "PGRECOVERY_POLL_INTERVAL": "1",
            "PGRECOVERY_GATE_RECHECK": "1",
            **(env or {}),
        },
        watching=("pgrecoveries",),
    )


class Operator:
    """The running operator as a user sees it: kubectl apply/get/wait, events, metrics, in
    `namespace` (NAMESPACE on the emulator, the test's own one on the real API server)."""

    def __init__(self, api: KubeAPI | RealKubeAPI, kubectl: Kubectl, process: KopfProcess,
                 port: int, namespace: str = NAMESPACE) -> None:
        self.api, self.kubectl, self.process, self.port = api, kubectl, process, port
        self.namespace = namespace

    def apply(self, *objects: dict[str, Any]) -> None:
        """kubectl apply; objects built for NAMESPACE (scenario manifests and Secrets) go to
        this operator's namespace."""
        for obj in objects:
            if obj.get("metadata", {}).get("namespace") == NAMESPACE:
                obj["metadata"]["namespace"] = self.namespace
        result = self.kubectl.apply(yaml.safe_dump_all(objects))
        assert result.returncode == 0, result.stderr

    def status(self, name: str) -> dict[str, Any]:
        obj = self.kubectl.json("pgr", name, "-n", self.namespace)
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def wait(self, name: str, condition: str, timeout: int = 420) -> None:
        result = self.kubectl.wait(
            f"pgr/{name}", "-n", self.namespace, f"--for=condition={condition}",
            f"--timeout={timeout}s",
        )
        assert result.returncode == 0, (
            f"{condition}: {result.stderr}\nstatus: {self.status(name)}\n"
            f"log tail:\n{self.process.log_text()[-4000:]}"
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.kubectl.json("events", "-n", self.namespace)["items"]
        return [e for e in items if e["involvedObject"]["name"] == name]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())


def recovery_operator(
    kube_api: KubeAPI,
    kubectl: Kubectl,
    kopf_operator_subprocess: Callable[..., KopfProcess],
    work_dir: Path,
    env: Mapping[str, str] | None = None,
) -> Operator:
    """`start_recovery_operator` wrapped as an `Operator` (the usual fixture body)."""
    port = free_port()
    process = start_recovery_operator(
        kube_api, kopf_operator_subprocess, work_dir, metrics_port=port, env=env
    )
    return Operator(kube_api, kubectl, process, port)


CHART = ROOT / "helm" / "pgrecovery-operator"


def render_chart(namespace: str, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects as Helm's library renders them for a release in `namespace` (its
    own release name: the chart's ClusterRoleBinding is cluster-wide)."""
    import helm_python  # noqa: PLC0415 - only the real-server tests need Helm's Go library

    rendered = helm_python.Chart.load(CHART).render(
        dict(values or {}), name=f"pgr-{namespace}", namespace=namespace, is_install=True
    )
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def install_chart(
    api: RealKubeAPI, kubectl: Kubectl, namespace: str, values: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, Any]], Path, str]:
    """The chart applied in `namespace` (Deployment included: no kubelet runs it here); returns
    its objects, a kubeconfig with the chart's ServiceAccount token and the user name the
    server records for that token (`system:serviceaccount:<namespace>:<name>`)."""
    objects = render_chart(namespace, values)
    applied = kubectl.apply(yaml.safe_dump_all(objects))
    assert applied.returncode == 0, applied.stderr
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    user = f"system:serviceaccount:{namespace}:{name}"
    return objects, api.serviceaccount_kubeconfig(namespace, name), user


def real_recovery_operator(
    api: RealKubeAPI,
    kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    namespace: str,
    work_dir: Path,
    env: Mapping[str, str] | None = None,
) -> Operator:
    """The same on the real API server (tests/realkube), in the test's own `namespace`, under
    the Helm chart's ServiceAccount token and Role: a call the chart does not allow is a 403."""
    port = free_port()
    api.install_crd(CRD)
    _, kubeconfig, user = install_chart(api, kubectl, namespace)
    process = real_kopf_operator(
        "pgrecovery.main",
        kubeconfig=kubeconfig,
        user=user,
        env={
            "PGRECOVERY_WORK_DIR": str(work_dir),
            "PGRECOVERY_METRICS_PORT": str(port),
            "PGRECOVERY_POLL_INTERVAL": "1",
            "PGRECOVERY_GATE_RECHECK": "1",
            **(env or {}),
        },
        watching=("pgrecoveries",),
    )
    return Operator(api, kubectl, process, port, namespace)
