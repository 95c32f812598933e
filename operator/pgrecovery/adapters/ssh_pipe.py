"""Stream bytes into a root command's stdin on a VM (`tar -x` of a base backup partition).

Why this module exists: a physical restore unpacks gigabytes of tar data into the data
directory; staging it as a file first would need that much extra room on the persistent disk.
`SshPool.upload` writes to a file; this is its sibling for a command. It lives in `adapters`
(it needs the pool's connection, an asyncssh object) and in its own module so the SSH module's
owner can fold it into `SshPool` later; it uses the pool's `_connection` for that reason.
Errors are converted exactly as `SshPool.upload` converts them. Integrity on the wire is the
SSH channel's MAC; the bytes themselves were checksum-verified (lzop) before streaming.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Sequence

import asyncssh

from pgrecovery.adapters.ssh import (
    UPLOAD_STALL_TIMEOUT,
    CommandResult,
    SshEndpoint,
    SshPool,
    _command_error,
    _decode,
    _exc_text,
    root_command,
)
from pgrecovery.errors import NodeUnreachable, RemoteCommandTimeout


async def pipe_to_root(
    pool: SshPool,
    node: SshEndpoint,
    argv: Sequence[str],
    chunks: AsyncIterable[bytes],
    *,
    timeout: float,
    progress: Callable[[int], None] | None = None,
) -> CommandResult:
    """Run `argv` as root with `chunks` as its stdin; RemoteCommandFailed on a non-zero exit."""
    command = root_command(argv, timeout=timeout)
    conn = await pool._connection(node)  # private on purpose: see the docstring
    done = 0
    try:
        async with conn.create_process(command, encoding=None) as proc:
            async for chunk in chunks:
                if not chunk:
                    continue
                proc.stdin.write(chunk)
                async with asyncio.timeout(UPLOAD_STALL_TIMEOUT):
                    await proc.stdin.drain()
                done += len(chunk)
                if progress is not None:
                    progress(done)
            proc.stdin.write_eof()
            async with asyncio.timeout(UPLOAD_STALL_TIMEOUT):
                stdout = await proc.stdout.read()
                stderr = await proc.stderr.read()
                await proc.wait_closed()
            # As in SshPool.upload: a channel torn down with the connection (VM power cut,
            # sshd killed) has no exit status; that is an unreachable node (retryable), not
            # a command that failed with 255 (fatal).
            if proc.exit_status is None and proc.exit_signal is None:
                raise asyncssh.ConnectionLost("the channel closed without an exit status")
            status = proc.exit_status if proc.exit_status is not None else 255
    except TimeoutError:
        pool.forget(node)
        raise RemoteCommandTimeout(
            f"{node.label}: streaming into {argv[0]} stalled after {done} bytes"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        pool.forget(node)
        raise NodeUnreachable(
            f"{node.label}: connection lost while streaming after {done} bytes: "
            f"{_exc_text(exc)}"
        ) from None
    result = CommandResult(status, _decode(stdout), _decode(stderr))
    if status != 0:
        raise _command_error(node, command, result)
    return result
