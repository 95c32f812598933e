"""The WAL-E test world: real PostgreSQL 15 archives in WAL-E's S3 layout (Dingo's backups).

- `walcmd.py`: archive_command / restore_command program (stdlib only; runs inside the VMs)
- `layout.py`: object names and WAL position arithmetic
- `archive.py`: ArchiveTarget, base backups (`make_base_backup`), WAL switches, the window
- `localpg.py`: a scratch local PostgreSQL (restores with plain tools, quick checks)
- `simarchive.py`, `fixtures.py`: archiving switched on in the simulated a9s-pg cluster
- `faults.py`: broken archives for negative tests, the PITR data shape

See README.md in this directory for the API.
"""
