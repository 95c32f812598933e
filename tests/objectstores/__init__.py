"""Object-store servers for tests: moto (S3), SeaweedFS (real S3 gateway), Azurite (Blob).

Owner: backups (issue 3). Everything starts on 127.0.0.1 on free ports and stops when the
test session ends. Use the pytest fixtures in `tests.objectstores.fixtures` (`moto_s3`,
`seaweedfs_s3`, `azurite`); `servers.py` holds the plain start/stop code for scripts.
"""
