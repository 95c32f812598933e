"""Top-level pytest configuration: the test environment's fixtures, shared by every tier.

- `tests.objectstores.fixtures`: moto / SeaweedFS S3 servers and Azurite, started per session.
- `tests.simcluster.fixtures`: the simulated 3-VM a9s-pg cluster (root, namespaces).
- `tests.kubeapi.fixtures`: the Kubernetes API emulator, kubectl, kopf operator runners.
- `tests.realkube.fixtures`: a real kube-apiserver + etcd (built by .ci/build-kube.sh).
- `tests.wale.fixtures`: WAL-E archives of the simulated cluster (S3 on its bridge, archiving on).
- `tests.dingo.fixtures`: the simulated Dingo cell (etcd, docker stand-in, instances).
- `tests.boshdirector.fixtures`: the BOSH director emulator over the simulated cluster, and the
  real bosh CLI (built by .ci/build-bosh.sh).
"""

pytest_plugins = [
    "tests.objectstores.fixtures",
    "tests.simcluster.fixtures",
    "tests.kubeapi.fixtures",
    "tests.realkube.fixtures",
    "tests.wale.fixtures",
    "tests.dingo.fixtures",
    "tests.boshdirector.fixtures",
]
