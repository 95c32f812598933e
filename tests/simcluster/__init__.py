"""The simulated a9s-pg cluster: three "BOSH VMs" built from Linux namespaces on this machine,
each running real sshd, PostgreSQL 15, repmgrd and monit, so integration tests and the demo
exercise the operator against the same commands and files as on a real a9s-pg deployment.

Public API (see each module):

- `SimCluster`, `SimVM`, `ClusterConfig`, `teardown` / `clean_stale` (cluster.py, config.py)
- fixtures `sim_cluster`, `healthy_sim_cluster` (fixtures.py)
- backups in the a9s layout: `make_s3_backup`, `make_azure_backup`, `A9sBackup` (backup.py)
- data and state helpers: `write_sample_data`, `table_checksums`, `parse_cluster_show`, ...
  (data.py)
- `python -m tests.simcluster up|down|status`
"""

from .backup import A9sBackup, BackupPart, make_azure_backup, make_s3_backup, write_backup_files
from .cluster import (
    ClusterInUse,
    Health,
    SimCluster,
    SimClusterError,
    SimVM,
    VMCommandError,
    clean_stale,
    missing_prerequisites,
    teardown,
)
from .config import ClusterConfig
from .data import (
    MonitService,
    ReplicationRow,
    RepmgrNode,
    SampleData,
    TableDigest,
    cluster_show,
    parse_cluster_show,
    parse_monit_summary,
    replication_slots,
    replication_status,
    streaming_standbys,
    table_checksums,
    wait_for_replay,
    write_sample_data,
)

__all__ = [
    "A9sBackup",
    "BackupPart",
    "ClusterConfig",
    "ClusterInUse",
    "Health",
    "MonitService",
    "ReplicationRow",
    "RepmgrNode",
    "SampleData",
    "SimCluster",
    "SimClusterError",
    "SimVM",
    "TableDigest",
    "VMCommandError",
    "clean_stale",
    "cluster_show",
    "make_azure_backup",
    "make_s3_backup",
    "missing_prerequisites",
    "parse_cluster_show",
    "parse_monit_summary",
    "replication_slots",
    "replication_status",
    "streaming_standbys",
    "table_checksums",
    "teardown",
    "wait_for_replay",
    "write_backup_files",
    "write_sample_data",
]
