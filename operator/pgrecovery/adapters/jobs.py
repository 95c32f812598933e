"""Detached root jobs on a VM that survive an SSH drop or an operator restart.

Why this module exists: restoring a multi-GB dump or re-cloning a standby takes longer than an
SSH connection can be trusted to live, and the operator itself may restart meanwhile. The job
must keep running on the VM, and whoever comes back must be able to ask "is it still running,
how did it end, what did it print?" — the start / poll / cancel shape of STYLE.md.

Mechanism (`systemd-run` is not available on BOSH stemcells nor in the test VMs): a constant
shell script run as root creates `<root>/<job-id>/` atomically with `mkdir` (so a second
`start_job` with the same id never starts a second process), then `setsid -f nohup sh -c
RUNNER` detaches a runner into its own session and process group. The runner records its PID,
runs the argv with stdin from a file and stdout+stderr into `log`, and writes the exit code to
`exit.tmp` then renames it to `exit` (a reader never sees a half-written code). `poll_job`
reads `exit`, or checks that the recorded PID is alive *and* still carries the job directory in
its command line (PIDs are recycled after a reboot), and returns the tail of the log. A job
whose process vanished without writing `exit` (power cut, OOM kill) is reported as LOST, and so
is one whose runner died before it recorded its PID (`STARTING_GRACE_SECONDS`).
`cancel_job` signals the whole process group (TERM, then KILL after a grace period) and writes
exit 143 with a `cancelled` flag.

A job is held at its start (already running, its command not yet) while a file
`<root>/hold-<prefix>` exists whose prefix begins the job id (`hold-restore` holds
`restore-<run>`): tests stop a job at a chosen point with it (the kill walk), and a person can use
it to look at a VM before a restore or a clone begins. Nothing creates such a file but a person or
a test; `cancel_job` ends a held job like any other.

Job ids are `[a-z0-9-]+` (validated), so the directory name is always safe. The argv is stored
in the job directory for people debugging on the VM; by contract it never holds a secret
(secrets travel via stdin files or pipes).
"""

from __future__ import annotations

import enum
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pgrecovery.adapters.ssh import RemoteShell, SshEndpoint, shell_script_argv
from pgrecovery.errors import RemoteCommandFailed

# Persistent disk, not /tmp: the job record must outlive a reboot so that a LOST job can be
# told apart from one that never started.
DEFAULT_JOBS_ROOT = "/var/vcap/store/pgrecovery/jobs"

_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,100}$")
_ROOT = re.compile(r"^/[A-Za-z0-9._/-]+$")

# A job whose runner has not recorded its pid this long after the job directory was made never
# will (the runner is forked at once; `start_job` waits 5 s for the pid): it died at its start,
# e.g. a power cut right after `start_job`, and is LOST — before, it stayed "starting" forever
# and the recovery polled it forever (found by the standby power-cut test).
STARTING_GRACE_SECONDS = 60

# Seconds `cancel_job` waits after SIGTERM before SIGKILL: psql/pg_basebackup exit quickly.
CANCEL_GRACE_SECONDS = 10

_START = r"""
set -eu
dir=$1; stdin=$2; shift 2
mkdir -p -m 0700 "${dir%/*}"
if ! mkdir -m 0700 "$dir" 2>/dev/null; then echo exists; exit 0; fi
printf '%s\n' "$@" > "$dir/argv"
: > "$dir/log"
setsid -f nohup sh -c '
  dir=$1; stdin=$2; shift 2
  echo $$ > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
  held() {
    for h in "${dir%/*}"/hold-*; do
      [ -e "$h" ] || continue
      case "${dir##*/}" in "${h##*/hold-}"*) return 0 ;; esac
    done
    return 1
  }
  while held; do sleep 0.1; done
  "$@" >> "$dir/log" 2>&1 < "$stdin"
  rc=$?
  echo $rc > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"
' pgrecovery-job "$dir" "$stdin" "$@" < /dev/null > /dev/null 2>&1
i=0
while [ ! -s "$dir/pid" ] && [ ! -e "$dir/exit" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
echo started
"""

_POLL = r"""
dir=$1; tail_bytes=$2; wait_tenths=${3:-0}; starting_grace=${4:-60}
if [ ! -d "$dir" ]; then echo state=absent; exit 0; fi
# Long poll: wait here (up to wait_tenths/10 s) while the job runs, so the caller hears of its
# end within 0.1 s instead of a whole poll interval later, at one SSH round trip per interval.
i=0
while [ "$i" -lt "$wait_tenths" ] && [ ! -f "$dir/exit" ]; do
  pid=$(cat "$dir/pid" 2>/dev/null || true)
  if [ -n "$pid" ] && ! grep -qaF -- "$dir" "/proc/$pid/cmdline" 2>/dev/null; then break; fi
  sleep 0.1; i=$((i+1))
done
# Liveness first, exit file second: the runner writes `exit` before it ends, so a job that
# ends between the two checks is seen as finished, never as lost.
pid=$(cat "$dir/pid" 2>/dev/null || true)
alive=no
if [ -n "$pid" ] && grep -qaF -- "$dir" "/proc/$pid/cmdline" 2>/dev/null; then alive=yes; fi
if [ -f "$dir/exit" ]; then
  echo state=finished; echo "exit=$(cat "$dir/exit")"
elif [ "$alive" = yes ]; then
  echo state=running
elif [ -z "$pid" ]; then
  # No pid yet: starting, unless the runner died before it recorded one (a power cut right
  # after the start: its pid.tmp names a dead process, or nothing appeared for too long).
  tmp=$(cat "$dir/pid.tmp" 2>/dev/null || true)
  born=$(stat -c %Y "$dir/argv" 2>/dev/null || date +%s)
  if [ -n "$tmp" ] && ! grep -qaF -- "$dir" "/proc/$tmp/cmdline" 2>/dev/null; then
    echo state=lost
  elif [ $(( $(date +%s) - born )) -gt "$starting_grace" ]; then
    echo state=lost
  else
    echo state=starting
  fi
else
  echo state=lost
fi
if [ -f "$dir/cancelled" ]; then echo cancelled=1; fi
echo "size=$(stat -c %s "$dir/log" 2>/dev/null || echo 0)"
echo ---
tail -c "$tail_bytes" "$dir/log" 2>/dev/null || true
"""

_CANCEL = r"""
dir=$1; grace=$2
[ -d "$dir" ] || exit 0
[ -f "$dir/exit" ] && exit 0
pid=$(cat "$dir/pid" 2>/dev/null || true)
if [ -n "$pid" ] && grep -qaF -- "$dir" "/proc/$pid/cmdline" 2>/dev/null; then
  kill -TERM -- "-$pid" 2>/dev/null || true
  i=0
  while kill -0 -- "-$pid" 2>/dev/null && [ $i -lt $((grace * 10)) ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL -- "-$pid" 2>/dev/null || true
fi
: > "$dir/cancelled"
[ -f "$dir/exit" ] || { echo 143 > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"; }
"""


class JobState(enum.Enum):
    ABSENT = "absent"
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"
    LOST = "lost"
    """No exit code and no live process: the VM rebooted or the runner was killed."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    exit_code: int | None = None
    cancelled: bool = False
    log_size: int = 0
    log_tail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.FINISHED and self.exit_code == 0 and not self.cancelled


def validate_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}: use [a-z0-9-]+")
    return job_id


def parse_poll_output(job_id: str, text: str) -> JobStatus:
    head, _, tail = text.partition("---\n")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        state = JobState(fields.get("state", ""))
    except ValueError:
        raise RemoteCommandFailed(f"unexpected job poll output for {job_id}: {head!r}") from None
    exit_text = fields.get("exit", "")
    return JobStatus(
        job_id=job_id,
        state=state,
        exit_code=int(exit_text) if exit_text.lstrip("-").isdigit() else None,
        cancelled=fields.get("cancelled") == "1",
        log_size=int(fields.get("size", "0") or 0) if fields.get("size", "0").isdigit() else 0,
        log_tail=tail,
    )


class JobRunner:
    """start / poll / cancel of detached root jobs over a `RemoteShell`."""

    def __init__(self, shell: RemoteShell, *, root: str = DEFAULT_JOBS_ROOT) -> None:
        if not _ROOT.match(root) or ".." in root:
            raise ValueError(f"unsafe jobs root {root!r}")
        self._shell = shell
        self.root = root.rstrip("/")

    def job_dir(self, job_id: str) -> str:
        return f"{self.root}/{validate_job_id(job_id)}"

    def log_path(self, job_id: str) -> str:
        return f"{self.job_dir(job_id)}/log"

    async def start_job(
        self,
        node: SshEndpoint,
        job_id: str,
        argv: Sequence[str],
        *,
        stdin_file: str = "/dev/null",
    ) -> JobStatus:
        """Start `argv` as a detached root job; a job with this id that exists is left alone
        (idempotent) and its status returned."""
        if not argv:
            raise ValueError("empty job argv")
        if not _ROOT.match(stdin_file) or ".." in stdin_file:
            raise ValueError(f"unsafe stdin file {stdin_file!r}")
        await self._shell.run_root(
            node,
            shell_script_argv(_START, self.job_dir(job_id), stdin_file, *argv),
            timeout=30,
        )
        return await self.poll_job(node, job_id)

    async def poll_job(
        self, node: SshEndpoint, job_id: str, *, tail_bytes: int = 4096, wait: float = 0.0
    ) -> JobStatus:
        """The job's state now, or — with `wait` seconds — as soon as it ends, but no later
        than `wait` seconds from now (a long poll: callers loop on it without sleeping)."""
        tenths = max(0, min(int(wait * 10), 600))
        res = await self._shell.run_root(
            node,
            shell_script_argv(_POLL, self.job_dir(job_id), str(int(tail_bytes)), str(tenths),
                              str(STARTING_GRACE_SECONDS)),
            timeout=30 + tenths / 10,
        )
        return parse_poll_output(job_id, res.stdout)

    async def cancel_job(self, node: SshEndpoint, job_id: str) -> JobStatus:
        await self._shell.run_root(
            node,
            shell_script_argv(_CANCEL, self.job_dir(job_id), str(CANCEL_GRACE_SECONDS)),
            timeout=CANCEL_GRACE_SECONDS + 30,
        )
        return await self.poll_job(node, job_id)

    async def remove_job(self, node: SshEndpoint, job_id: str) -> None:
        """Forget a finished job (its directory); refuses while it runs."""
        status = await self.poll_job(node, job_id, tail_bytes=0)
        if status.state in (JobState.RUNNING, JobState.STARTING):
            raise RemoteCommandFailed(f"{node.label}: job {job_id} is still running")
        if status.state is not JobState.ABSENT:
            await self._shell.run_root(node, ["rm", "-rf", "--", self.job_dir(job_id)], timeout=60)

    def log_lines(
        self, node: SshEndpoint, job_id: str, *, timeout: float = 600
    ) -> AsyncIterator[str]:
        """Every line of the job's log, streamed (logs can be large)."""
        return self._shell.stream_root_lines(node, ["cat", "--", self.log_path(job_id)],
                                             timeout=timeout)
