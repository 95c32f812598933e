"""Tests leave /tmp clean (issue 18): the simulated cluster's owner lock goes with the cluster,
and pytest keeps temp directories only of failing tests, for two sessions.

The SeaweedFS half (glog files and unix sockets) needs the server: tests/integration/
test_objectstores_tmp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.simcluster.cluster import ClusterInUse, OwnerLock, holder, remove_lock

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_owner_lock_file_is_removed_when_the_cluster_goes_down(tmp_path: Path) -> None:
    path = tmp_path / "simcluster-x.lock"
    lock = OwnerLock(path)
    lock.acquire(wait_s=1)
    assert holder(path) == os.getpid()
    assert not remove_lock(path), "a held lock must never be removed"
    assert path.exists()
    lock.release(remove=True)
    assert not path.exists()
    # released without `remove` (detach: a keeper inherits it), the file stays
    lock.acquire(wait_s=1)
    lock.release()
    assert path.exists()
    assert remove_lock(path)  # nobody holds it: teardown removes it
    assert not path.exists()


def test_a_waiter_never_shares_ownership_with_a_new_owner(tmp_path: Path) -> None:
    """Owner A removes the file while B waits on it: B must not own the unlinked file while
    C owns the new one — B notices and takes the file the path names."""
    path = tmp_path / "simcluster-y.lock"
    a, b, c = OwnerLock(path), OwnerLock(path), OwnerLock(path)
    a.acquire(wait_s=1)
    waiting = threading.Thread(target=b.acquire, kwargs={"wait_s": 10})
    waiting.start()
    time.sleep(0.2)  # B has the old file open and retries its flock every 0.5 s
    a.release(remove=True)
    waiting.join(10)
    assert b.fd is not None
    held = os.fstat(b.fd)
    on_disk = os.stat(path)
    assert (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
    with pytest.raises(ClusterInUse):
        c.acquire(wait_s=0.6)
    b.release(remove=True)
    assert not path.exists()


def test_pytest_keeps_temp_dirs_only_of_failing_tests_for_two_sessions(tmp_path: Path) -> None:
    """Inner pytest sessions with this project's configuration (`-c pyproject.toml`), their
    temp root redirected: a passing test's tmp_path (1 MiB) is gone, a failing test's is kept,
    and after four sessions two session directories remain."""
    tests = tmp_path / "inner"
    tests.mkdir()
    (tests / "test_inner.py").write_text(
        "import pytest\n"
        "def test_passes(tmp_path):\n"
        "    (tmp_path / 'big').write_bytes(b'x' * 2**20)\n"
        "def test_fails(tmp_path):\n"
        "    (tmp_path / 'evidence').write_text('kept')\n"
        "    pytest.fail('on purpose')\n"
    )
    temproot = tmp_path / "temproot"
    temproot.mkdir()
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(temproot)}
    for _ in range(4):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
             "--rootdir", str(tests), "-p", "no:cacheprovider", "-q", str(tests)],
            capture_output=True, text=True, env=env, check=False, timeout=120,
        )
        assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    (user_dir,) = temproot.iterdir()
    sessions = sorted(p for p in user_dir.iterdir() if p.name.startswith("pytest-")
                      and not p.is_symlink())
    assert len(sessions) == 2, sessions
    kept = sorted(p.name for p in sessions[-1].rglob("*") if p.is_file())
    assert "evidence" in kept
    assert "big" not in kept
