"""The e2e modules' shared `operator` fixture: the real operator (`kopf run`, the real plans) on
the real kube-apiserver, in the test's own namespace, under the Helm chart's ServiceAccount token
and Role. Objects built for NAMESPACE are applied there by `Operator.apply`. Modules that need
other settings (the kill walk, the lease test) build their own with `real_recovery_operator`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.operator_harness import Operator, real_recovery_operator
from tests.kubeapi.harness import KopfProcess, Kubectl
from tests.realkube.server import RealKubeAPI


@pytest.fixture
def operator(
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    real_namespace: str,
    tmp_path: Path,
) -> Operator:
    return real_recovery_operator(
        real_kube_api, real_kubectl, real_kopf_operator, real_namespace, tmp_path / "work"
    )
