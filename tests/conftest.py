"""Top-level pytest configuration: the test environment's fixtures, shared by every tier.

- `tests.objectstores.fixtures`: moto / SeaweedFS S3 servers and Azurite, started per session.
- `tests.simcluster.fixtures`: the simulated 3-VM a9s-pg cluster (root, namespaces).
- `tests.kubeapi.fixtures`: the Kubernetes API emulator, kubectl, kopf operator runners.
"""

pytest_plugins = [
    "tests.objectstores.fixtures",
    "tests.simcluster.fixtures",
    "tests.kubeapi.fixtures",
]
