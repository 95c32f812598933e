"""pytest fixtures around the real kube-apiserver + etcd (registered in tests/conftest.py).

- `real_kube_api` (session) → `RealKubeAPI`: started once per session in a temp dir, stopped
  and removed at the end. Without the binaries it skips — and fails under `CI=true`, where
  `.ci/setup` must have built them (no silent fallback to the emulator). A start failure fails
  with one line naming the log.
- `real_namespace` → a fresh namespace per test (`t-<8 hex>`), deleted at teardown.
- `real_kubectl` → `Kubectl` as admin, defaulting to that namespace, own discovery cache.
- `real_kopf_operator` → factory `(module, *, env=None, args=(), watching=(), kubeconfig=None,
  user=None, start=True) -> KopfProcess` in that namespace: with `kubeconfig` (e.g.
  `real_kube_api.serviceaccount_kubeconfig(ns, sa)`) the operator runs with that identity and
  RBAC applies; `user` is then the name the audit log records (default: the ServiceAccount's
  `system:serviceaccount:…` name is the caller's to give). Stopped at teardown.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.kubeapi.harness import KopfProcess, Kubectl
from tests.realkube.server import KubeStartError, RealKubeAPI, missing_binaries


@pytest.fixture(scope="session")
def real_kube_api() -> Iterator[RealKubeAPI]:
    problem = missing_binaries()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"real Kubernetes API: {problem}", pytrace=False)
        pytest.skip(f"real Kubernetes API: {problem}")
    api = RealKubeAPI(Path(tempfile.mkdtemp(prefix="pgrecovery-kube-")))
    try:
        api.start()
    except KubeStartError as e:
        pytest.fail(f"real Kubernetes API did not start: {e}", pytrace=False)
    try:
        yield api
    finally:
        api.stop()
        api.remove()


@pytest.fixture
def real_namespace(real_kube_api: RealKubeAPI) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    real_kube_api.create_namespace(name)
    yield name
    # Without kube-controller-manager the namespace stays Terminating; etcd dies with the session.
    real_kube_api.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def real_kubectl(real_kube_api: RealKubeAPI, real_namespace: str, tmp_path: Path) -> Kubectl:
    return Kubectl(kubeconfig=real_kube_api.kubeconfig, cache_dir=tmp_path / "kubectl-cache",
                   namespace=real_namespace)


@pytest.fixture
def real_kopf_operator(real_kube_api: RealKubeAPI, real_namespace: str,
                       tmp_path: Path) -> Iterator[Callable[..., KopfProcess]]:
    made: list[KopfProcess] = []

    def make(module: str, *, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
             watching: Sequence[str] = (), kubeconfig: Path | None = None,
             user: str | None = None, start: bool = True) -> KopfProcess:
        index = len(made) + 1
        operator = KopfProcess(real_kube_api, module, namespace=real_namespace,
                               user=user or f"kopf-{index}",
                               log_path=tmp_path / f"kopf-{index}.log", env=env, args=args,
                               watching=watching, kubeconfig=kubeconfig)
        made.append(operator)
        if start:
            operator.start()
        return operator

    yield make
    for operator in made:
        operator.stop()


__all__ = ["real_kopf_operator", "real_kube_api", "real_kubectl", "real_namespace"]
