"""A toy kopf operator proving, against the API emulator, the kopf mechanisms pgrecovery uses.

Run as `kopf run -m tests.kubeapi.toy_operator --namespace NS --standalone` (subprocess or
`KopfRunner`). Its resource is `toys.toy.pgrecovery.dev` (`toy_crd.yaml` next to this file);
`spec.mode` picks the behaviour:

- `chain`: the create handler sets `status.phase: A`; `@kopf.on.field(field='status.phase',
  new=…)` handlers move it A→B→C and set the `Done` condition — "a status change from one
  phase fires the next phase's handler", the backbone of pgrecovery's phase machine.
- `poll`: one handler raises `kopf.TemporaryError(delay=1)` until attempt `spec.polls`, writing
  progress (`status.pollAttempts`, `status.pollLog` with the pid of each attempt) on every try;
  its retry count survives a SIGKILL of the operator, so a restarted one continues the count.
- `idle`: nothing, so `kubectl wait --for=condition=Done` must time out.

Every object gets the operator's finalizer (there is a delete handler), so deletion waits for
the operator; every step posts an Event (names from `generateName`).

What the real operator must do to run against the emulator (and why):

- `--standalone` (or `settings.peering.standalone = True`): the emulator serves no
  `kopf.dev` peering resources unless their CRDs are applied to it. Without the flag kopf
  1.45 finds no peering resource and runs unpeered without a word; say it explicitly.
- An explicit `@kopf.on.login` that reads `$KUBECONFIG` when called, here
  `kopf.login_with_kubeconfig`: kopf's implicit login goes through the `kubernetes` client,
  whose `KUBECONFIG` default is fixed when that library is first imported — wrong when tests
  point several operators at several emulators from one process.
- `--namespace NS` with the Namespace created first (kopf watches namespaces and silently
  serves nothing in a missing one); the emulator pre-creates only `default` and `kube-*`.
- No other setting is needed: the emulator speaks the watch protocol kopf expects
  (list + watch from the list's resourceVersion, bookmarks well within
  `settings.watching.inactivity_timeout`), stores kopf's progress in annotations and
  `status.kopf` (the default `SmartProgressStorage`, status via the `/status` subresource),
  and answers JSON-patch finalizer updates with kopf's optimistic-concurrency rules.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

import kopf

GROUP = "toy.pgrecovery.dev"
VERSION = "v1"
PLURAL = "toys"
FINALIZER = f"{GROUP}/finalizer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own finalizer name, as the real operator should use (not kopf's generic default).
    settings.persistence.finalizer = FINALIZER


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_kubeconfig(**kwargs)


def _mode(mode: str) -> Callable[..., bool]:
    def check(spec: kopf.Spec, **_: Any) -> bool:
        return spec.get("mode") == mode

    return check


def _done_condition(message: str) -> list[dict[str, Any]]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [{"type": "Done", "status": "True", "reason": "Finished", "message": message,
             "lastTransitionTime": now}]


@kopf.on.create(GROUP, VERSION, PLURAL, id="chain-start", when=_mode("chain"))
def chain_start(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "A"
    kopf.info(body, reason="Phase", message="entered phase A")


@kopf.on.field(GROUP, VERSION, PLURAL, id="chain-a", field="status.phase", new="A")
def chain_a(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "B"
    kopf.info(body, reason="Phase", message="A done, entered phase B")


@kopf.on.field(GROUP, VERSION, PLURAL, id="chain-b", field="status.phase", new="B")
def chain_b(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "C"
    kopf.info(body, reason="Phase", message="B done, entered phase C")


@kopf.on.field(GROUP, VERSION, PLURAL, id="chain-c", field="status.phase", new="C")
def chain_c(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status["conditions"] = _done_condition("phases A, B, C completed")
    kopf.info(body, reason="Phase", message="C done")


@kopf.on.create(GROUP, VERSION, PLURAL, id="poll", when=_mode("poll"))
def poll(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, retry: int,
         patch: kopf.Patch, **_: Any) -> None:
    # The pgrecovery pattern for long work: never sleep, report progress, retry with a delay.
    attempt = retry + 1
    wanted = int(spec.get("polls", 3))
    patch.status["pollAttempts"] = attempt
    patch.status["pollLog"] = [*status.get("pollLog", []), f"{attempt}@{os.getpid()}"]
    kopf.info(body, reason="Polling", message=f"poll attempt {attempt}/{wanted}")
    if attempt < wanted:
        patch.status["phase"] = "Polling"
        raise kopf.TemporaryError(f"not ready after attempt {attempt}", delay=1)
    patch.status["phase"] = "Polled"
    patch.status["conditions"] = _done_condition(f"ready after {attempt} attempts")


@kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
def cleanup(body: kopf.Body, **_: Any) -> None:
    kopf.info(body, reason="Cleanup", message="released the finalizer")
