"""A PgRecovery that reaches the simulated cluster through the director emulator: the
scenario's manifest with `target.bosh` instead of nodes + ssh, and the two Secrets it names
(UAA client, director CA). Shared by the operator e2e tests and the demo."""

from __future__ import annotations

from typing import Any

from tests.scenario import Scenario

from .director import DirectorEmulator

CREDENTIALS_SECRET = "bosh-director"
CA_SECRET = "bosh-director-ca"


def bosh_recovery_objects(
    scenario: Scenario, director: DirectorEmulator, name: str, namespace: str, client: str
) -> list[dict[str, Any]]:
    """[Secrets of the scenario, director Secrets, PgRecovery] for `kubectl apply`."""
    manifest = scenario.manifest(name, namespace)
    target = manifest["spec"]["target"]
    target.pop("nodes")
    target.pop("ssh")
    target["bosh"] = {
        "director": director.url,
        "caCertSecretRef": {"name": CA_SECRET, "key": "ca.crt"},
        "credentialsSecretRef": {"name": CREDENTIALS_SECRET},
    }
    secrets: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace},
            "stringData": {"client": client, "clientSecret": director.clients[client].secret},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CA_SECRET, "namespace": namespace},
            "stringData": {"ca.crt": director.pki.ca_pem},
        },
    ]
    return [*scenario.kube_secrets(namespace), *secrets, manifest]


def ephemeral_users_left(director: DirectorEmulator, deployment: str) -> dict[str, list[str]]:
    """VM name → pgrecovery's ephemeral users still on it."""
    return {
        vm: [u for u in users if u.startswith("bosh_pgrecovery_")]
        for vm, users in director.ssh_users(deployment).items()
    }
