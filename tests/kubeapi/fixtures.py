"""pytest fixtures that put a Kubernetes API, kubectl and kopf operators around a test.

Register in the top-level conftest with `pytest_plugins = ["tests.kubeapi.fixtures"]`.

- `kube_api` → `KubeAPI`: a fresh emulator per test (a background thread, plain HTTP on
  127.0.0.1) and a kubeconfig for it; `kube_api_options` (overridable, e.g. by parametrize)
  are its keyword arguments (`bookmark_interval`, `history_limit`, `watch_timeout`).
  Teardown fails the test if the emulator itself crashed on a request (a 500 is an emulator
  bug, never an expected answer).
- `kubectl` → `Kubectl`: the real `/usr/bin/kubectl` with that kubeconfig and a private
  discovery cache; returns `CompletedProcess` and never raises on a non-zero exit.
- `kopf_operator_subprocess` → factory `(module, *, namespace, env=None, args=(),
  watching=(), start=True) -> KopfProcess`: a real `kopf run -m MODULE --namespace NS
  --standalone --verbose` process with its own identity towards the emulator and its log in a
  file; `kill()` is a SIGKILL, `start()` (re)starts it, `stop()` is a SIGTERM.
- `kopf_operator_inprocess` → factory `(module, *, namespace, args=(), watching=())
  -> KopfInProcess`: the same through kopf's `KopfRunner` in a thread of the test process
  (easier to debug; takes ~5 s to stop). `-m module`, never a file path: with a path,
  KopfRunner imports the module a second time (duplicated Prometheus metrics).

With `watching=("plural", …)` a factory returns only once the operator watches each of those
resources in its namespace, so an object created afterwards is seen as a creation. The
namespace must exist first (kopf silently serves nothing in a missing one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests.kubeapi.harness import KopfInProcess, KopfProcess, KubeAPI, Kubectl, wait_watching
from tests.kubeapi.server import EmulatorThread


@pytest.fixture
def kube_api_options() -> dict[str, Any]:
    """Keyword arguments of the emulator; override per test with
    `@pytest.mark.parametrize("kube_api_options", [{"watch_timeout": 1.0}])`."""
    return {}


@pytest.fixture
def kube_api(tmp_path: Path, kube_api_options: dict[str, Any]) -> Iterator[KubeAPI]:
    directory = tmp_path / "kubeapi"
    with EmulatorThread(**kube_api_options) as server:
        api = KubeAPI(server=server, kubeconfig=Path(), directory=directory)
        api.kubeconfig = api.user_kubeconfig("admin")
        yield api
        crashes = list(api.emulator.errors)
    if crashes:
        pytest.fail(f"the API emulator failed on {len(crashes)} request(s): {crashes!r}")


@pytest.fixture
def kubectl(kube_api: KubeAPI, tmp_path: Path) -> Kubectl:
    return Kubectl(kubeconfig=kube_api.kubeconfig, cache_dir=tmp_path / "kubectl-cache")


@pytest.fixture
def kopf_operator_subprocess(kube_api: KubeAPI,
                             tmp_path: Path) -> Iterator[Callable[..., KopfProcess]]:
    """Factory: `kopf_operator_subprocess(module, namespace=…, env=…, args=…, watching=…,
    start=True)` → `KopfProcess`; all are stopped at teardown."""
    made: list[KopfProcess] = []

    def make(module: str, *, namespace: str, env: Mapping[str, str] | None = None,
             args: Sequence[str] = (), watching: Sequence[str] = (),
             start: bool = True) -> KopfProcess:
        index = len(made) + 1
        operator = KopfProcess(kube_api, module, namespace=namespace, user=f"kopf-{index}",
                               log_path=tmp_path / f"kopf-{index}.log", env=env, args=args,
                               watching=watching)
        made.append(operator)
        if start:
            operator.start()
        return operator

    yield make
    for operator in made:
        operator.stop()


@pytest.fixture
def kopf_operator_inprocess(
    kube_api: KubeAPI, monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., KopfInProcess]]:
    """Factory of `KopfInProcess` (see the module docstring).

    `$KUBECONFIG` is set for the whole test process; the operator module should log in with an
    explicit `@kopf.on.login` that reads it when called (see toy_operator).
    """
    made: list[KopfInProcess] = []

    def make(module: str, *, namespace: str, args: Sequence[str] = (),
             watching: Sequence[str] = (), ready_timeout: float = 60.0) -> KopfInProcess:
        user = f"kopf-inprocess-{len(made) + 1}"
        monkeypatch.setenv("KUBECONFIG", str(kube_api.user_kubeconfig(user, namespace)))
        since = kube_api.mark()
        runner = KopfRunner(["run", "-m", module, "--namespace", namespace, "--standalone",
                             "--verbose", *args], timeout=60)
        runner.__enter__()
        operator = KopfInProcess(runner, user)
        made.append(operator)
        if watching:
            wait_watching(kube_api, user=user, namespace=namespace, since=since,
                           resources=watching, timeout=ready_timeout,
                           alive=lambda: not runner.future.done())
        return operator

    yield make
    for operator in made:
        operator.stop()


__all__ = [
    "kopf_operator_inprocess",
    "kopf_operator_subprocess",
    "kube_api",
    "kube_api_options",
    "kubectl",
]
