"""`pgrecovery status -f recovery.yaml`: what a local recovery did, for people and for scripts.

Why this module exists: a local run keeps its whole status in a JSON file (the same fields as
the PgRecovery's `.status` in Kubernetes), but reading that file by hand means knowing its
shape, and a script that waits for a recovery wants the same document `kubectl get -o yaml`
would give. So `status` prints a summary in words (phase, outcome, where the time went, the
steps under the phase each ran in, the nodes, the restore proof, what is left on the VMs and
what to do next) or, with `-o json|yaml`, the status document itself. It never runs anything
on the cluster and needs no secrets.

Exit codes, for scripts: 0 succeeded (or a finished dry run), 1 failed, 2 in progress or
stopped before the end (`--resume` continues), 3 blocked (a gate waits for a person).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pgrecovery.cli_recover import add_run_arguments, load_recovery_file
from pgrecovery.engine.local import StatusFile
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.status import (
    WARNING_CONDITIONS,
    ConditionType,
    RecoveryStatus,
    proof_summary,
)
from pgrecovery.errors import ConfigurationError

OUTPUTS = ("text", "json", "yaml")


def status_document(name: str, status: RecoveryStatus) -> dict[str, Any]:
    """The machine-readable form: what `kubectl get pgrecovery <name> -o json` holds as
    `.metadata.name` and `.status` (camelCase, the CRD's field names)."""
    return {"name": name, "status": status.to_dict()}


def exit_code(status: RecoveryStatus) -> int:
    if status.is_true(ConditionType.SUCCEEDED):
        return 0
    if status.failure_reason is not None:
        return 1
    blocked = status.condition(ConditionType.BLOCKED)
    if blocked is not None and blocked.status == "True":
        return 0 if blocked.reason == "DryRunComplete" else 3
    return 2


def describe(name: str, status: RecoveryStatus) -> str:
    """The summary in words; steps are listed under the phase they ran in (their own record),
    not under the phase the recovery is in now."""
    lines = [f"recovery {name}: phase {status.phase.value}"]
    if status.failure_reason:
        lines.append(f"FAILED ({status.failure_reason}): {status.message}")
    elif status.message:
        lines.append(status.message)
    for kind in WARNING_CONDITIONS:
        warning = status.condition(kind)
        if warning is not None and warning.status == "True":
            lines.append(f"WARNING {kind.value}: {warning.message}")
    backup = status.backup
    if backup.id:
        size = f", {backup.size_bytes} bytes in {backup.parts} part(s)" if backup.parts else ""
        lines.append(f"backup {backup.id}{size}")
    if status.phase_durations:
        total = sum(status.phase_durations.values())
        # In the order the phases run (the file keeps its keys sorted by name).
        order = {phase.value: i for i, phase in enumerate(Phase)}
        spent = ", ".join(f"{phase} {secs:.1f}s" for phase, secs in sorted(
            status.phase_durations.items(), key=lambda kv: order.get(kv[0], len(order))))
        lines.append(f"time: {spent} (total {total:.1f}s)")
    current = None
    for step in status.steps:
        if step.phase != current:
            current = step.phase
            lines.append(f"phase {current.value}:")
        took = f" ({step.seconds:.1f}s)" if step.seconds is not None else ""
        detail = f": {step.message}" if step.message else ""
        lines.append(f"  {step.state.value:<9} {step.name}{took}{detail}")
    if status.nodes:
        lines.append("nodes:")
        lines += [f"  {n.name:<10} {n.role:<8} {n.state:<12} {n.monit}".rstrip()
                  for n in status.nodes]
    proof = proof_summary(status.restore_proof)
    if proof:
        lines.append(proof)
    leftovers = status.facts.get("leftovers")
    if leftovers:
        lines.append(f"left on the VMs (removed by `pgrecovery cleanup`): {leftovers}")
    nxt = status.facts.get("nextSteps")
    if nxt and status.is_true(ConditionType.SUCCEEDED):
        lines.append(f"next: {nxt}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    name, _spec = load_recovery_file(Path(args.file))
    path = Path(args.status_file or f"{name}.status.json")
    if not path.exists():
        raise ConfigurationError(
            f"no status file at {path}: `pgrecovery recover -f {args.file}` writes it "
            "(or pass --status-file)")
    _, status = StatusFile(path).load()
    if args.output == "json":
        print(json.dumps(status_document(name, status), indent=2, sort_keys=True))
    elif args.output == "yaml":
        sys.stdout.write(yaml.safe_dump(status_document(name, status), sort_keys=True))
    else:
        print(describe(name, status))
    return exit_code(status)


def register_status(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = groups.add_parser(
        "status",
        help="show what a local recovery did (text, or -o json|yaml)",
        description="Print the status of a local recovery from its status file: phase, "
        "outcome, time per phase, the steps under the phase each ran in, nodes, restore "
        "proof, leftovers and the next step; `-o json|yaml` prints the status document "
        "itself (the fields of the PgRecovery's .status). Exit code: 0 succeeded, 1 failed, "
        "2 not finished (--resume continues), 3 waiting at a gate.",
    )
    add_run_arguments(p)
    p.add_argument("-o", "--output", choices=OUTPUTS, default="text",
                   help="text (default), json or yaml")
    p.set_defaults(func=_status)
