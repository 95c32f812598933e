"""`pgrecovery recover -f recovery.yaml`: the whole recovery without Kubernetes.

Why this module exists: when the Kubernetes cluster is down too, a platform operator runs the
same engine from a laptop or jump host. The recovery file is a PgRecovery manifest (the same one
GitOps would apply); secrets come from a directory laid out like mounted Secrets
(`--secrets-dir DIR/<secret>/<key>`) or from `PGRECOVERY_SECRET_<SECRET>_<KEY>` variables,
never from the command line. Progress is printed live; the status is written to a JSON file after
each change, and `--resume` continues from it after an interruption.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from pgrecovery.adapters.bosh_env import BoshEnvSecrets, apply_bosh_environment
from pgrecovery.adapters.local_secrets import LocalSecrets
from pgrecovery.engine.breakpoints import NO_BREAKPOINTS, Breakpoints
from pgrecovery.engine.local import LocalRun, cleanup_local, run_local
from pgrecovery.engine.plan import load_plan_factory
from pgrecovery.engine.status import WARNING_CONDITIONS, ConditionType, RecoveryStatus
from pgrecovery.engine.steps import StepEvent, StepEventKind
from pgrecovery.engine.supervisor import RetryPolicy
from pgrecovery.errors import ConfigurationError, InvalidSpec

DEFAULT_PLAN_FACTORY = "pgrecovery.plans:build_plan"


def load_recovery_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(name, raw spec) from a PgRecovery manifest; clear errors for the usual mistakes."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"{path} is not valid YAML: {exc}") from None
    recoveries = [d for d in documents if isinstance(d, dict) and d.get("kind") == "PgRecovery"]
    if len(recoveries) != 1:
        raise InvalidSpec(f"{path} must contain exactly one PgRecovery (found {len(recoveries)})")
    document = recoveries[0]
    name = str((document.get("metadata") or {}).get("name") or path.stem)
    spec = document.get("spec")
    if not isinstance(spec, dict):
        raise InvalidSpec("the PgRecovery has no spec", field="spec")
    return name, spec


class TerminalReporter:
    """Prints step transitions as lines and progress as one updating line (on a TTY)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last_progress = ""

    def __call__(self, event: StepEvent | None, status: RecoveryStatus) -> None:
        if event is not None:
            mark = {
                StepEventKind.STARTED: "→",
                StepEventKind.FINISHED: "✓",
                StepEventKind.SKIPPED: "·",
                StepEventKind.FAILED: "✗",
            }[event.kind]
            detail = f": {event.message}" if event.message else ""
            self._clear()
            print(f"[{event.phase.value:<10}] {mark} {event.step}{detail}", file=self.out)
            return
        progress = status.progress
        if progress.percent is not None and progress.detail:
            line = f"[{status.phase.value:<10}]   {progress.percent:3d}% {progress.detail}"
            if line != self._last_progress:
                self._last_progress = line
                if self.tty:
                    self.out.write("\r\x1b[2K" + line[:160])
                    self.out.flush()
                else:
                    print(line, file=self.out)

    def _clear(self) -> None:
        if self.tty and self._last_progress:
            self.out.write("\r\x1b[2K")
        self._last_progress = ""


DEFAULT_RETRIES = RetryPolicy().limit


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _local_run(args: argparse.Namespace, name: str, spec: dict[str, Any]) -> LocalRun:
    """What `recover` and `cleanup` share: files named after the recovery, secrets, plans."""
    secrets_dir = Path(args.secrets_dir) if args.secrets_dir else None
    if secrets_dir is not None and not secrets_dir.is_dir():
        raise ConfigurationError(f"--secrets-dir {secrets_dir} is not a directory")
    return LocalRun(
        name=name,
        # No nodes/ssh/bosh in the file: the bosh CLI's BOSH_* variables say where (issue 21).
        spec=apply_bosh_environment(spec, os.environ),
        status_file=Path(args.status_file or f"{name}.status.json"),
        work_dir=Path(args.work_dir or f"{name}.work"),
        secrets=BoshEnvSecrets(LocalSecrets(secrets_dir)),
        plan_factory=load_plan_factory(args.plan_factory),
        retry=RetryPolicy(limit=args.retries),
        # The operator's test-only setting, read the same way (unset: no breakpoints).
        breakpoints=Breakpoints(Path(os.environ["PGRECOVERY_BREAKPOINT_DIR"]))
        if os.environ.get("PGRECOVERY_BREAKPOINT_DIR") else NO_BREAKPOINTS,
    )


async def _recover(args: argparse.Namespace) -> int:
    name, spec = load_recovery_file(Path(args.file))
    if args.confirm is not None:
        spec = {**spec, "confirm": args.confirm}
    run = _local_run(args, name, spec)
    status_file = run.status_file
    run.work_dir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    reporter = TerminalReporter(out)
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # First Ctrl-C: stop at the next safe point and keep the status for --resume.
        loop.add_signal_handler(sig, cancel.set)
    try:
        final = await run_local(run, resume=args.resume, on_event=reporter, cancel_event=cancel)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    reporter._clear()
    print(f"status written to {status_file}", file=out)
    for kind in WARNING_CONDITIONS:
        warning = final.condition(kind)
        if warning is not None and warning.status == "True":
            print(f"WARNING {kind.value}: {warning.message}", file=out)
    if final.is_true(ConditionType.SUCCEEDED):
        durations = ", ".join(f"{k} {v:.1f}s" for k, v in final.phase_durations.items())
        print(f"recovery complete: {final.message} ({durations})", file=out)
        return 0
    blocked = final.condition(ConditionType.BLOCKED)
    if blocked is not None and blocked.status == "True":
        print(f"stopped: {blocked.message}", file=out)
        return 0 if blocked.reason == "DryRunComplete" else 3
    print(f"recovery FAILED ({final.failure_reason}): {final.message}", file=out)
    return 1


def register_recover(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = groups.add_parser(
        "recover",
        help="run a recovery locally, without Kubernetes (resumable)",
        description="Run the five phases of a PgRecovery manifest locally, without Kubernetes. "
        "Secrets come from --secrets-dir (<secret>/<key> files) or "
        "PGRECOVERY_SECRET_<SECRET>_<KEY> variables, never from the command line.",
    )
    add_run_arguments(p, work_dir="downloaded parts go here (default: <name>.work)")
    p.add_argument("--resume", action="store_true", help="continue from the status file")
    p.add_argument(
        "--confirm",
        metavar="DEPLOYMENT",
        help="set spec.confirm (lets destructive phases run when it equals target.deployment)",
    )
    p.set_defaults(func=_recover)


def add_run_arguments(p: argparse.ArgumentParser, *, work_dir: str | None = None) -> None:
    """The arguments that name one local run: its manifest and status file and, for the
    commands that reach the VMs (`work_dir` = the help text), its work and secrets
    directories."""
    p.add_argument("-f", "--file", required=True, help="PgRecovery manifest (YAML)")
    p.add_argument("--status-file", help="status JSON of the run (default: <name>.status.json)")
    if work_dir is None:
        return
    p.add_argument("--work-dir", help=work_dir)
    p.add_argument("--secrets-dir", help="directory with <secret-name>/<key> files")
    p.add_argument(
        # A string default goes through `type` like an argument: a bad variable is a usage error.
        "--retries", type=_non_negative,
        default=os.environ.get("PGRECOVERY_RETRY_LIMIT", str(DEFAULT_RETRIES)),
        help="retryable failures (store 5xx, unreachable node or jumpbox) tolerated per phase "
             "before the recovery fails, waiting 5 s, 10 s, ... up to 300 s between them; 0 = "
             f"fail at the first (default {DEFAULT_RETRIES}, or PGRECOVERY_RETRY_LIMIT as for "
             "the operator)")
    p.add_argument("--plan-factory", default=DEFAULT_PLAN_FACTORY, help=argparse.SUPPRESS)


async def _cleanup(args: argparse.Namespace) -> int:
    name, spec = load_recovery_file(Path(args.file))
    run = _local_run(args, name, spec)
    status_file = run.status_file
    if not status_file.is_file():
        raise ConfigurationError(f"--status-file {status_file} does not exist: cleanup removes "
                                 "what the run recorded there")
    removed = await cleanup_local(run)
    for entry in removed:
        print(f"removed {entry}", file=sys.stdout)
    print(f"cleanup done: {len(removed)} removed; {status_file} kept as the record",
          file=sys.stdout)
    return 0


def register_cleanup(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = groups.add_parser(
        "cleanup",
        help="remove what a local recovery left on the VMs and in its work directory",
        description="After a failed or abandoned local recovery: stop its jobs on the VMs "
        "(a restore or a clone still running) and remove the staged dump, job records and "
        "logs, clone markers and the downloaded parts. The status file stays. A new "
        "`pgrecovery recover` does not need this: it continues from whatever state it finds.",
    )
    add_run_arguments(p, work_dir="the run's work directory (default: <name>.work)")
    p.set_defaults(func=_cleanup)


def _demo(_args: argparse.Namespace) -> int:
    """Run tests/demo.py from the source checkout this package was installed from."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "demo.py").is_file():
        raise ConfigurationError(
            "the demo drives the simulated cluster in tests/, so it needs the source checkout "
            "(install with `pip install -e .` from the repository)"
        )
    sys.path.insert(0, str(root))
    import importlib  # noqa: PLC0415 - only the demo needs it

    demo = importlib.import_module("tests.demo")
    return int(demo.run_demo())


def register_demo(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = groups.add_parser(
        "demo",
        help="a whole recovery on the simulated cluster (needs root and a source checkout)",
        description="Brings up the simulated 3-VM a9s-pg cluster and an S3 server, backs up "
        "sample data the runbook's way, damages it, applies a PgRecovery to the operator "
        "through the Kubernetes API emulator, follows it live, verifies, and cleans up.",
    )
    p.set_defaults(func=_demo)
