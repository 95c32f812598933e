"""A SeaweedFS server started by the tests leaves nothing in /tmp once stopped.

`weed` writes its glog files (`weed.<host>.<user>.log.*`) into /tmp unless given `-logdir`,
and creates unix sockets `/tmp/seaweedfs-<service>[-grpc]-<port>.sock` (the gRPC ones cannot
be moved) that it leaves behind when killed; tests/objectstores/servers.py sends the logs to the
server's own directory and removes its sockets. Checked by name (the s3 port, this server's
directory), since other test sessions may run SeaweedFS on the same machine at the same time.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.objectstores.servers import ServerUnavailable, start_seaweedfs

pytestmark = pytest.mark.integration


def test_seaweedfs_leaves_no_logs_or_sockets_in_tmp(tmp_path: Path) -> None:
    try:
        server = start_seaweedfs(tmp_path)
    except ServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    try:
        port = urlsplit(server.endpoint_url).port
        socket = Path(f"/tmp/seaweedfs-s3-{port}.sock")
        assert socket.exists(), "weed no longer makes its socket in /tmp: update servers.py"
        (root,) = tmp_path.glob("seaweedfs-*")
        logs = sorted(p.name for p in (root / "logs").iterdir())
        assert "weed.INFO" in logs, logs
    finally:
        server.stop()
    assert not socket.exists()
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))
    assert not root.exists()
