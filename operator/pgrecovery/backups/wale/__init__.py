"""Reading WAL-E archives (Dingo PostgreSQL) for physical point-in-time recovery.

Pure logic and byte streams, like the rest of `backups`; S3 is reached only through
`adapters.objectstore.ObjectStore`.

    layout     key layout, WAL file names ↔ segments, base backup names
    lzop       streaming lzop decoder (real file format, every block checksum verified)
    walscan    system identifier and commit/abort times from WAL segments
    history    timeline history, backup history (`.backup`), pg_control's system identifier
    archive    list_archive → Archive (complete base backups, segments, histories, sysid)
    planning   recovery window, base backup choice, timelines, WAL continuity
    fetch      download + verify (checksums, sysid), window end, WAL needed for a target
"""
