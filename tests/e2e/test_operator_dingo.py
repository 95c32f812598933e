"""A deleted Dingo service instance restored through the operator: `kubectl apply` a walE →
dingo PgRecovery, a real `kopf run` restores it into the new instance on the simulated cell.

Same story as tests/integration/test_dingo_recovery.py, driven as users do: Secrets and the
PgRecovery in the real API server, `kubectl wait --for=condition=Succeeded`, the status showing
the archive, the container and the restored system id; the copied bytes in the metrics; no
secret (the operator's S3 keys, the SSH key, the container's S3 keys from `docker inspect`)
in status, events or the operator's log.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.dingo.cell import DingoCell
from tests.dingo.world import (
    S3_SECRET,
    SSH_SECRET,
    DeletedService,
    deleted_service,
    manifest,
    table_digest,
)
from tests.e2e.operator_harness import NAMESPACE, Operator
from tests.objectstores.servers import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms, pytest.mark.slow]


@pytest.fixture
def dingo_operator(operator: Operator) -> Operator:
    """The shared operator (tests/e2e/conftest.py)."""
    return operator


@pytest.fixture
def world(dingo_cell: DingoCell, moto_s3: S3Server) -> Iterator[DeletedService]:
    made = deleted_service(dingo_cell, moto_s3)
    yield made
    dingo_cell.delete_instance(made.new)


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def test_kubectl_apply_restores_the_deleted_instance(
    dingo_operator: Operator, world: DeletedService
) -> None:
    name = "important-db"
    recovery = manifest(world, name)
    recovery["metadata"]["namespace"] = NAMESPACE
    dingo_operator.apply(
        _secret(
            S3_SECRET,
            {
                "AWS_ACCESS_KEY_ID": world.operator_keys[0].encode(),
                "AWS_SECRET_ACCESS_KEY": world.operator_keys[1].encode(),
            },
        ),
        _secret(
            SSH_SECRET,
            {
                "id_ed25519": world.cell.client_key_path.read_bytes(),
                "known_hosts": world.cell.known_hosts.encode(),
            },
        ),
        recovery,
    )
    dingo_operator.wait(name, "Succeeded", timeout=900)

    status = dingo_operator.status(name)
    assert status["phase"] == "Rejoined"
    assert status["primary"] == world.cell.vm.name
    facts = status["facts"]
    assert facts["container"] == world.new.container
    assert facts["restoredSysid"] == world.old_sysid
    assert world.old.instance_id in facts["oldArchive"]
    world.new.wait_leader()
    assert world.new.sysid() == world.old_sysid
    assert table_digest(world.new) == world.old_digest
    assert 'pgrecovery_bytes_total{stage="copied"}' in dingo_operator.metrics()
    texts = [
        yaml.safe_dump(status),
        yaml.safe_dump(dingo_operator.events(name)),
        dingo_operator.process.log_text(),
    ]
    for secret in world.secret_strings():
        assert all(secret not in text for text in texts)
