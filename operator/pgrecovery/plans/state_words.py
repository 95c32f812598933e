"""What each destructive step of an a9s-pg plan did to the cluster, in words, for the message of
a failure after the point of no return (`Plan.state_words`, `supervisor.left_in_words`).

Why this module exists: one table for the logical and the WAL-E plan; `test_plan_shape`
checks that every destructive step of both plans has its words.
"""

from __future__ import annotations

#: What each destructive step did to the cluster, in words, for the message of a failure after
#: the point of no return (`Plan.state_words`).
STATE_WORDS = {
    "ensure-standbys-stopped": "standbys stopped (monit)",
    "ensure-repmgr-stopped-on-primary": "repmgr stopped on the primary",
    "ensure-inactive-slots-dropped": "inactive replication slots dropped",
    "ensure-connections-blocked": "new connections to the primary refused (pg_hba narrowed; "
                                  "the original kept as pg_hba.conf.pgrecovery-orig)",
    "ensure-startup-locks-clear": "stale startup locks removed",
    "ensure-databases-replaced": "the dump's databases dropped (the restore creates them "
                                 "again)",
    "ensure-bulk-load-settings": "checkpoint settings raised for the restore",
    "restore-dump": "the dump restored into the primary",
    "ensure-bulk-load-settings-reverted": "checkpoint settings back",
    "ensure-wal-free-settings": "the primary restarted with wal_level minimal, no WAL senders, "
                                "archive_mode off (marker wal-free-settings)",
    "ensure-wal-free-settings-reverted": "wal_level, WAL senders and archive_mode back "
                                         "(restarted)",
    "ensure-repmgr-schema-truncated": "repmgr's tables emptied (no node listed until the "
                                      "primary is registered again)",
    "ensure-primary-registered": "the primary registered in repmgr",
    "ensure-repmgr-running-on-primary": "repmgr running on the primary",
    "ensure-clone-marker": "clone marker written on the primary",
    "ensure-standbys-recloned": "standbys wiped, re-cloned and streaming",
    "verify-cluster": "cluster verified",
    "prove-restore-on-primary": "every restored table counted on the primary (read only)",
    "prove-restore-on-standbys": "every restored table counted on the standbys (read only)",
    "ensure-staging-file-removed": "staged dump removed",
    "ensure-connections-unblocked": "connections allowed again",
    "ensure-recovery-files-removed": "recovery files removed",
    # WAL-E point in time (its Restoring steps)
    "ensure-postgres-stopped-on-primary": "PostgreSQL stopped on the primary",
    "ensure-data-dir-replaced": "the primary's data directory replaced (the old one set aside "
                                "or wiped: see facts)",
    "ensure-base-backup-extracted": "base backup extracted",
    "ensure-recovery-configured": "recovery to the point in time configured",
    "ensure-recovery-started": "WAL replay started",
    "wait-for-promotion": "primary promoted at the point in time",
    "ensure-leftovers-removed": "the staged WAL, the saved configuration and the old data "
                                "directory removed from the primary",
    "ensure-recovery-settings-removed": "recovery settings removed",
}
