"""The SSH adapter and the detached job runner against a real OpenSSH server.

Proves, on a real sshd (tests/sshd_fixture.py): quoting survives hostile arguments, errors
map to pgrecovery.errors (exit status, stderr head, timeouts, host key, auth, unreachable),
one connection per node is reused and re-opened after a drop, uploads are checksummed and
resume, and jobs survive the SSH connection that started them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pgrecovery.adapters.jobs import STARTING_GRACE_SECONDS, JobRunner, JobState
from pgrecovery.adapters.ssh import (
    FileSource,
    SshAuth,
    SshEndpoint,
    SshPool,
    root_shell,
    shell_script_argv,
)
from pgrecovery.errors import (
    AuthenticationFailed,
    ChecksumMismatch,
    ConfigurationError,
    HostKeyMismatch,
    NodeUnreachable,
    RemoteCommandFailed,
    RemoteCommandTimeout,
)
from tests.sshd_fixture import LocalSshd, local_sshd  # noqa: F401 - pytest fixture

pytestmark = pytest.mark.integration

HOSTILE = [
    "; rm -rf /tmp/pgrecovery-should-not-exist",
    "$(touch /tmp/pgrecovery-pwned)",
    "`touch /tmp/pgrecovery-pwned`",
    "it's \"quoted\"",
    "line1\nline2; touch /tmp/pgrecovery-pwned",
    "--help",
    "*",
    "a\\b",
    "",
]


def _node(sshd: LocalSshd) -> SshEndpoint:
    return SshEndpoint("pg/0", sshd.host, sshd.port)


def _auth(sshd: LocalSshd, **kw: object) -> SshAuth:
    return SshAuth(sshd.user, sshd.private_key, sshd.known_hosts, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def pool(local_sshd: LocalSshd) -> AsyncIterator[SshPool]:  # noqa: F811
    async with SshPool(_auth(local_sshd)) as p:
        yield p


async def test_hostile_arguments_arrive_verbatim(pool: SshPool, local_sshd: LocalSshd) -> None:  # noqa: F811
    Path("/tmp/pgrecovery-pwned").unlink(missing_ok=True)
    res = await pool.run_root(_node(local_sshd), ["printf", "%s\\0", *HOSTILE])
    assert res.stdout.split("\0")[:-1] == HOSTILE
    res = await pool.run_root(
        _node(local_sshd), shell_script_argv('printf "%s\\0" "$@"', *HOSTILE)
    )
    assert res.stdout.split("\0")[:-1] == HOSTILE
    assert not Path("/tmp/pgrecovery-pwned").exists()


async def test_root_shell_text_is_one_quoted_command(local_sshd: LocalSshd) -> None:  # noqa: F811
    text = root_shell('echo "$1"', "$(id)")
    assert "'$(id)'" in text
    assert text.startswith("sudo -n -- bash -c ")


async def test_exit_status_and_stderr_are_mapped(pool: SshPool, local_sshd: LocalSshd) -> None:  # noqa: F811
    with pytest.raises(RemoteCommandFailed) as err:
        await pool.run_root(
            _node(local_sshd),
            shell_script_argv('for i in 1 2 3 4 5 6 7; do echo "bad $i" >&2; done; exit 3'),
        )
    assert err.value.exit_status == 3
    assert err.value.stderr.splitlines() == [f"bad {i}" for i in range(1, 6)]
    res = await pool.run_root(_node(local_sshd), ["false"], check=False)
    assert res.exit_status == 1


async def test_stdin_carries_secrets_not_the_command_line(
    pool: SshPool, local_sshd: LocalSshd  # noqa: F811
) -> None:
    secret = "s3cr3t-never-on-argv"
    script = 'read -r x; ps -eo args | grep -c -- "$x" || true; echo "$x" | sha256sum'
    res = await pool.run_root(_node(local_sshd), shell_script_argv(script), input=secret + "\n")
    count, digest = res.stdout.split()[0], res.stdout.split()[1]
    # Only the grep itself shows the value (it got it through a variable expansion).
    assert count == "1"
    assert digest == hashlib.sha256((secret + "\n").encode()).hexdigest()


async def test_command_timeout_kills_the_remote_command(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    marker = tmp_path / "still-running"
    started = time.monotonic()
    with pytest.raises(RemoteCommandTimeout):
        await pool.run_root(
            _node(local_sshd),
            shell_script_argv('sleep 30; touch "$1"', str(marker)),
            timeout=1,
        )
    assert time.monotonic() - started < 15
    await asyncio.sleep(0.5)
    out = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == ""


async def test_wrong_host_key_is_refused(local_sshd: LocalSshd) -> None:  # noqa: F811
    auth = SshAuth(local_sshd.user, local_sshd.private_key, local_sshd.wrong_known_hosts())
    async with SshPool(auth) as p:
        with pytest.raises(HostKeyMismatch, match="host key"):
            await p.run_root(_node(local_sshd), ["true"])


async def test_no_known_hosts_is_a_configuration_error(local_sshd: LocalSshd) -> None:  # noqa: F811
    with pytest.raises(ConfigurationError, match="known_hosts"):
        SshPool(SshAuth(local_sshd.user, local_sshd.private_key, None))


async def test_insecure_opt_out_warns_on_every_connect(
    local_sshd: LocalSshd, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    auth = SshAuth(local_sshd.user, local_sshd.private_key, None, insecure_ignore_host_keys=True)
    caplog.set_level(logging.WARNING, logger="pgrecovery.adapters.ssh")
    async with SshPool(auth) as p:
        await p.run_root(_node(local_sshd), ["true"])
        p.forget(_node(local_sshd))
        await p.run_root(_node(local_sshd), ["true"])
    warnings = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warnings) == 2


async def test_wrong_client_key_is_authentication_failure(
    local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    auth = SshAuth(local_sshd.user, other.read_bytes(), local_sshd.known_hosts)
    async with SshPool(auth) as p:
        with pytest.raises(AuthenticationFailed):
            await p.run_root(_node(local_sshd), ["true"])


async def test_closed_port_is_unreachable(local_sshd: LocalSshd) -> None:  # noqa: F811
    node = SshEndpoint("pg/9", "127.0.0.1", 1)
    async with SshPool(_auth(local_sshd), connect_timeout=3) as p:
        with pytest.raises(NodeUnreachable, match="pg/9"):
            await p.run_root(node, ["true"])


async def test_unroutable_address_times_out_as_unreachable(local_sshd: LocalSshd) -> None:  # noqa: F811
    node = SshEndpoint("pg/8", "192.0.2.1", 22)  # TEST-NET-1: never answers
    async with SshPool(_auth(local_sshd), connect_timeout=1) as p:
        started = time.monotonic()
        with pytest.raises(NodeUnreachable):
            await p.run_root(node, ["true"])
        assert time.monotonic() - started < 10


def _connection_processes(sshd: LocalSshd) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(sshd.pid)], capture_output=True, text=True,
                         check=False)
    return {int(p) for p in out.stdout.split()}


async def test_one_connection_per_node_and_reconnect_after_drop(
    pool: SshPool, local_sshd: LocalSshd  # noqa: F811
) -> None:
    node = _node(local_sshd)
    before = _connection_processes(local_sshd)
    await asyncio.gather(*(pool.run_root(node, ["true"]) for _ in range(10)))
    mine = _connection_processes(local_sshd) - before
    assert len(mine) == 1
    for pid in mine:
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    # The dropped connection is noticed and a new one opened.
    res = await pool.run_root(node, ["echo", "back"])
    assert res.stdout.strip() == "back"


async def _random_stream(size: int, seed: bytes = b"x") -> AsyncIterator[bytes]:
    block = hashlib.sha256(seed).digest() * 4096  # 128 KiB
    sent = 0
    while sent < size:
        chunk = block[: size - sent]
        sent += len(chunk)
        yield chunk


async def test_upload_stream_with_progress_and_checksum(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    dest = tmp_path / "dst" / "a.dump"
    dest.parent.mkdir()
    seen: list[int] = []
    size = 3 * 1024 * 1024 + 17
    result = await pool.upload(_node(local_sshd), _random_stream(size), str(dest),
                               progress=seen.append)
    data = dest.read_bytes()
    assert len(data) == size == result.size
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert seen == sorted(seen)
    assert seen[-1] == size
    assert not Path(str(dest) + ".part").exists()


async def test_upload_resumes_a_matching_partial_file(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    src = tmp_path / "src.dump"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    dest = tmp_path / "b.dump"
    Path(str(dest) + ".part").write_bytes(src.read_bytes()[:1_000_000])
    result = await pool.upload(_node(local_sshd), FileSource(src), str(dest))
    assert result.resumed_from == 1_000_000
    assert dest.read_bytes() == src.read_bytes()

    # A partial file that does not match the source is replaced from byte 0.
    Path(str(dest) + ".part").write_bytes(b"garbage" * 1000)
    result = await pool.upload(_node(local_sshd), FileSource(src), str(dest))
    assert result.resumed_from == 0
    assert dest.read_bytes() == src.read_bytes()


# ----------------------------------------------------------------- jobs


async def _wait(runner: JobRunner, node: SshEndpoint, job: str, timeout: float = 20) -> JobState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await runner.poll_job(node, job)
        if status.state not in (JobState.RUNNING, JobState.STARTING):
            return status.state
        await asyncio.sleep(0.2)
    raise AssertionError("job did not finish")


async def test_job_start_poll_finish_idempotent(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    runner = JobRunner(pool, root=str(tmp_path / "jobs"))
    node = _node(local_sshd)
    counter = tmp_path / "runs"
    stdin = tmp_path / "in.txt"
    stdin.write_text("from-stdin\n")
    argv = shell_script_argv('echo run >> "$1"; cat; sleep 1; echo "$2" >&2; exit 7',
                             str(counter), "$(id) ; x")
    first = await runner.start_job(node, "job-1", argv, stdin_file=str(stdin))
    assert first.state in (JobState.RUNNING, JobState.STARTING, JobState.FINISHED)
    again = await runner.start_job(node, "job-1", argv, stdin_file=str(stdin))
    assert again.state is not JobState.ABSENT
    assert await _wait(runner, node, "job-1") is JobState.FINISHED
    status = await runner.poll_job(node, "job-1")
    assert status.exit_code == 7
    assert not status.succeeded
    assert status.log_tail == "from-stdin\n$(id) ; x\n"
    assert counter.read_text() == "run\n"  # started once
    lines = [line async for line in runner.log_lines(node, "job-1")]
    assert lines == ["from-stdin", "$(id) ; x"]
    with pytest.raises(ValueError):
        await runner.start_job(node, "Bad_ID;rm", ["true"])


async def test_job_survives_the_ssh_connection(
    local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    node = _node(local_sshd)
    root = str(tmp_path / "jobs")
    async with SshPool(_auth(local_sshd)) as p1:
        await JobRunner(p1, root=root).start_job(
            node, "long", shell_script_argv("sleep 2; echo survived")
        )
    # The connection that started the job is closed; a new one finds it finished later.
    async with SshPool(_auth(local_sshd)) as p2:
        runner = JobRunner(p2, root=root)
        assert (await runner.poll_job(node, "long")).state is JobState.RUNNING
        assert await _wait(runner, node, "long") is JobState.FINISHED
        status = await runner.poll_job(node, "long")
        assert status.succeeded
        assert status.log_tail == "survived\n"


async def test_job_cancel_and_lost(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    node = _node(local_sshd)
    runner = JobRunner(pool, root=str(tmp_path / "jobs"))
    await runner.start_job(node, "cancel-me", ["sleep", "300"])
    status = await runner.cancel_job(node, "cancel-me")
    assert status.state is JobState.FINISHED
    assert status.cancelled
    assert status.exit_code == 143
    assert not status.succeeded

    await runner.start_job(node, "lose-me", ["sleep", "300"])
    pid = int((tmp_path / "jobs" / "lose-me" / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # what a power cut does to the job
    await asyncio.sleep(0.3)
    assert (await runner.poll_job(node, "lose-me")).state is JobState.LOST
    await runner.remove_job(node, "lose-me")
    assert (await runner.poll_job(node, "lose-me")).state is JobState.ABSENT


async def test_a_job_killed_before_it_recorded_its_pid_is_lost(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    """A power cut right after `start_job`: the job directory exists but its runner died
    before `pid` was written. Seen for real (the standby power-cut test polled such a clone job
    for ever): it is LOST, not "starting" — at once when `pid.tmp` names a dead process, after
    STARTING_GRACE_SECONDS when nothing was recorded."""
    node = _node(local_sshd)
    root = tmp_path / "jobs"
    runner = JobRunner(pool, root=str(root))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid_tmp in (("clone-a", str(dead.pid)), ("clone-b", None)):
        job = root / name
        job.mkdir(parents=True)
        (job / "argv").write_text("pg_basebackup\n")
        (job / "log").write_text("")
        if pid_tmp is not None:
            (job / "pid.tmp").write_text(pid_tmp + "\n")
    assert (await runner.poll_job(node, "clone-a")).state is JobState.LOST
    assert (await runner.poll_job(node, "clone-b")).state is JobState.STARTING  # just made
    old = time.time() - STARTING_GRACE_SECONDS - 5
    os.utime(root / "clone-b" / "argv", (old, old))
    assert (await runner.poll_job(node, "clone-b")).state is JobState.LOST
    # A live runner between writing pid.tmp and renaming it is still starting.
    live = subprocess.Popen(["sh", "-c", "sleep 30", str(root / "clone-c")])
    try:
        job = root / "clone-c"
        job.mkdir()
        (job / "argv").write_text("x\n")
        (job / "pid.tmp").write_text(f"{live.pid}\n")
        assert (await runner.poll_job(node, "clone-c")).state is JobState.STARTING
    finally:
        live.kill()
        live.wait()


async def test_hold_file_keeps_a_job_at_its_start_until_removed(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    """`<root>/hold-<prefix>` holds the jobs whose id starts with the prefix (running, their
    command not started); other jobs run; removing the file lets the held job go; a held job
    can be cancelled."""
    node = _node(local_sshd)
    root = tmp_path / "jobs"
    root.mkdir()
    runner = JobRunner(pool, root=str(root))
    marker = tmp_path / "ran"
    (root / "hold-restore").touch()
    await runner.start_job(node, "restore-run1", shell_script_argv('touch "$1"', str(marker)))
    await runner.start_job(node, "clone-pg-1-run1", ["true"])
    assert await _wait(runner, node, "clone-pg-1-run1") is JobState.FINISHED  # not held
    await asyncio.sleep(0.5)
    held = await runner.poll_job(node, "restore-run1")
    assert held.state is JobState.RUNNING
    assert not marker.exists()
    (root / "hold-restore").unlink()
    assert await _wait(runner, node, "restore-run1") is JobState.FINISHED
    assert marker.exists()

    (root / "hold-restore").touch()
    await runner.start_job(node, "restore-run2", ["true"])
    cancelled = await runner.cancel_job(node, "restore-run2")
    assert cancelled.cancelled
    assert cancelled.exit_code == 143


async def test_connections_prefer_aes_gcm(pool: SshPool, local_sshd: LocalSshd) -> None:  # noqa: F811
    """The dump upload's cipher: AES-GCM (AES-NI, one call per packet), not asyncssh's
    default chacha20-poly1305; see CIPHER_PREFERENCE."""
    conn = await pool._connection(_node(local_sshd))
    assert conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    assert conn.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"


async def test_long_poll_returns_when_the_job_ends_not_at_the_interval(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    """`poll_job(wait=…)` waits on the VM: it answers within ~0.1 s of the job's end, and a
    job that keeps running is reported RUNNING once the wait is over; a lost job at once."""
    node = _node(local_sshd)
    runner = JobRunner(pool, root=str(tmp_path / "jobs"))
    await runner.start_job(node, "short", shell_script_argv("sleep 1; echo done"))
    t = time.monotonic()
    status = await runner.poll_job(node, "short", wait=20)
    took = time.monotonic() - t
    assert status.state is JobState.FINISHED
    assert status.succeeded
    assert took < 5, f"the long poll took {took:.1f}s for a 1 s job"

    await runner.start_job(node, "long", ["sleep", "300"])
    t = time.monotonic()
    status = await runner.poll_job(node, "long", wait=1.0)
    took = time.monotonic() - t
    assert status.state is JobState.RUNNING
    assert 0.9 <= took < 10, took
    await runner.cancel_job(node, "long")

    await runner.start_job(node, "lose-me", ["sleep", "300"])
    pid = int((tmp_path / "jobs" / "lose-me" / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    t = time.monotonic()
    assert (await runner.poll_job(node, "lose-me", wait=20)).state is JobState.LOST
    assert time.monotonic() - t < 5
    assert (await runner.poll_job(node, "absent", wait=20)).state is JobState.ABSENT


async def test_checksum_mismatch_keeps_the_partial_file(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    async def corrupted(node: SshEndpoint, path: str, *, size_hint: int = 0) -> str:
        return "0" * 64  # what a disk that flipped a bit would report

    monkeypatch.setattr(pool, "remote_sha256", corrupted)
    dest = tmp_path / "c.dump"
    with pytest.raises(ChecksumMismatch, match="sha256"):
        await pool.upload(_node(local_sshd), _random_stream(4096), str(dest))
    assert not dest.exists()
    assert Path(str(dest) + ".part").stat().st_size == 4096


async def test_pipe_to_root_streams_and_a_torn_connection_is_unreachable(
    pool: SshPool, local_sshd: LocalSshd, tmp_path: Path  # noqa: F811
) -> None:
    """`SshPool.pipe_root` (the base backup's `tar -x` feed): bytes arrive; a connection torn down
    mid-stream (VM power cut) is NodeUnreachable — retryable — never a fatal 'exit 255'."""
    node = _node(local_sshd)
    dest = tmp_path / "piped"
    size = 2 * 1024 * 1024 + 5
    result = await pool.pipe_root(node, ["dd", f"of={dest}", "bs=1M", "status=none"],
                                _random_stream(size), timeout=60)
    assert result.exit_status == 0
    assert dest.stat().st_size == size

    async def torn() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        (await pool._connection(node)).abort()  # what a power cut does to the channel
        await asyncio.sleep(0.2)
        yield b"y" * 65536

    with pytest.raises(NodeUnreachable, match="pg/0"):
        await pool.pipe_root(node, ["dd", f"of={tmp_path / 'torn'}", "status=none"],
                           torn(), timeout=60)
