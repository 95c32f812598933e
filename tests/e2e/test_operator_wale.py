"""Point-in-time recovery from a WAL-E archive through the operator: `kubectl apply` a
walE PgRecovery → a real `kopf run` restores the simulated a9s-pg cluster to the target time.

Same world as tests/integration/test_wale_pitr.py (the cluster archives into S3 itself), but
driven as users do: Secrets and the PgRecovery in the API emulator, `kubectl wait`, the status
showing the recovery window and the point reached, no secret in status, events or log.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.operator_harness import NAMESPACE, Operator
from tests.scenario import leftover_scan
from tests.simcluster.data import wait_for_replay
from tests.wale import faults
from tests.wale.simarchive import WaleArchive

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]

S3_SECRET = "wale-store"
SSH_SECRET = "a9s-pg-ssh"


@pytest.fixture
def wale_operator(operator: Operator) -> Operator:
    """The shared operator (tests/e2e/conftest.py)."""
    return operator


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _objects(archive: WaleArchive, name: str, target_time: str) -> list[dict[str, Any]]:
    cluster = archive.cluster
    recovery = {
        "apiVersion": "pgrecovery.dev/v1alpha1", "kind": "PgRecovery",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {
                "type": "walE",
                "backupGuid": archive.service_guid,
                "s3": {"bucket": archive.target.bucket, "region": archive.target.region,
                       "endpoint": archive.target.endpoint_url,
                       "credentialsSecretRef": {"name": S3_SECRET}},
            },
            "target": {
                "type": "a9sPg", "deployment": "a9s-pg", "nodes": cluster.nodes_spec(),
                "ssh": {"user": cluster.ssh_user,
                        "privateKeySecretRef": {"name": SSH_SECRET, "key": "id_ed25519"},
                        "knownHostsSecretRef": {"name": SSH_SECRET, "key": "known_hosts"}},
            },
            "pointInTime": {"targetTime": target_time},
            "confirm": "a9s-pg",
        },
    }
    return [
        _secret(S3_SECRET, {"AWS_ACCESS_KEY_ID": archive.target.access_key.encode(),
                            "AWS_SECRET_ACCESS_KEY": archive.target.secret_key.encode()}),
        _secret(SSH_SECRET, {"id_ed25519": cluster.client_key_path.read_bytes(),
                             "known_hosts": cluster.known_hosts.encode()}),
        recovery,
    ]


@pytest.mark.slow
def test_kubectl_apply_recovers_the_cluster_to_a_point_in_time(
    wale_operator: Operator, wale_archive: WaleArchive, tmp_path: Path
) -> None:
    point = faults.commit_rows_around_time(wale_archive.pg, wale_archive.target,
                                           rows_a=40, rows_b=25)
    name = "pitr-operator"
    wale_operator.apply(*_objects(wale_archive, name, point.target_time.isoformat()))
    wale_operator.wait(name, "Succeeded", timeout=900)

    status = wale_operator.status(name)
    assert status["phase"] == "Rejoined"
    facts = status["facts"]
    assert wale_archive.base_backup.name in facts["recoveryWindow"]
    assert status["backup"]["id"] == wale_archive.base_backup.name
    assert "recovered to" in facts["reachedPoint"]
    wait_for_replay(wale_archive.cluster, timeout=60)
    for vm in wale_archive.cluster.vms:
        counts = vm.psql(f"SELECT batch || '=' || count(*) FROM public.{point.table} "  # noqa: S608 - H4's generated name
                         "GROUP BY batch ORDER BY batch")
        assert counts.split() == ["A=40"], vm.name
    assert wale_archive.cluster.wait_healthy(timeout=60).ok
    # Nothing of the recovery left: WAL, saved config, old data, jobs, journal, clone markers
    # on the VMs, the fetched base backup and WAL on the work volume.
    assert status["facts"]["cleanup"].startswith("done; removed "), status["facts"]
    scan = leftover_scan(wale_archive.cluster, tmp_path / "work", dump_of=None)
    assert scan == [], scan
    secrets = [wale_archive.target.secret_key]
    texts = [yaml.safe_dump(status), yaml.safe_dump(wale_operator.events(name)),
             wale_operator.process.log_text()]
    for secret in secrets:
        assert all(secret not in text for text in texts)
