"""One executor per recovery: a `coordination.k8s.io/v1` Lease per PgRecovery.

Why this module exists: with more than one operator replica, kopf peering is not a lock — a
restarted replica that draws a higher priority takes over while the other's handlers still run,
and destructive steps of one recovery could overlap. Before it runs any phase of a recovery, a
replica must hold the recovery's Lease (`pgrecovery-<uid>`), renew it while the work runs, and
stop that work when it cannot renew in time. Another replica takes the Lease only after it has
seen it unchanged for a whole lease duration (by its own clock, as client-go's leader election
does: holders' clocks are never compared), so a SIGKILLed holder is replaced after one duration.

Every write is an update with the `resourceVersion` read just before it: two replicas racing for
an expired Lease cannot both win (the loser gets 409 Conflict). This is the only module besides
`kube.py` that imports the `kubernetes` client; its errors become RetryableError here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgrecovery.errors import RetryableError


@dataclass
class _Seen:
    """A holder's Lease as last read: its resourceVersion and when we first saw that version."""

    version: str
    since: float  # monotonic


@dataclass(frozen=True)
class LeaseState:
    """The outcome of `acquire`: held by us, or by someone else (and since when we know)."""

    held: bool
    holder: str
    took_over: bool = False  # we replaced an expired holder (its work may have been cut off)


class KubeLeases:
    """Acquire / renew / release the executor Lease of a recovery, as `identity`."""

    def __init__(self, identity: str, duration: float, api: Any | None = None) -> None:
        self.identity = identity
        self.duration = duration
        self._api = api
        self._seen: dict[tuple[str, str], _Seen] = {}

    def _coordination(self) -> Any:
        if self._api is None:
            from kubernetes import client, config  # noqa: PLC0415 - heavy import, only when used

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoordinationV1Api()
        return self._api

    async def acquire(self, namespace: str, name: str) -> LeaseState:
        """Take or renew the Lease; `held=False` names the live holder."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        api = self._coordination()
        try:
            try:
                lease = await asyncio.to_thread(api.read_namespaced_lease, name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                return await self._create(api, namespace, name)
            spec = lease.spec
            holder = (spec.holder_identity if spec is not None else None) or ""
            version = lease.metadata.resource_version
            if holder == self.identity:
                await self._write(api, namespace, name, lease, transitions=0)
                return LeaseState(True, holder)
            key = (namespace, name)
            seen = self._seen.get(key)
            now = time.monotonic()
            if holder and (seen is None or seen.version != version):
                self._seen[key] = _Seen(version, now)
                return LeaseState(False, holder)
            if holder and seen is not None and now - seen.since < self.duration:
                return LeaseState(False, holder)
            # Unchanged for a whole duration (or released): ours, if nobody was faster.
            await self._write(api, namespace, name, lease, transitions=1)
            self._seen.pop(key, None)
            return LeaseState(True, self.identity, took_over=bool(holder))
        except ApiException as exc:
            if exc.status == 409:
                return LeaseState(False, "another replica (it won a race for the Lease)")
            raise RetryableError(f"executor Lease {namespace}/{name}: HTTP {exc.status} "
                                 f"({exc.reason})") from None
        except OSError as exc:
            raise RetryableError(f"Kubernetes API unreachable: {exc.__class__.__name__}") from None

    async def release(self, namespace: str, name: str) -> None:
        """Delete the Lease if we hold it (best effort: it expires anyway)."""
        from kubernetes import client  # noqa: PLC0415
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        api = self._coordination()
        try:
            lease = await asyncio.to_thread(api.read_namespaced_lease, name, namespace)
            if (lease.spec.holder_identity or "") != self.identity:
                return
            options = client.V1DeleteOptions(
                preconditions=client.V1Preconditions(
                    resource_version=lease.metadata.resource_version))
            await asyncio.to_thread(api.delete_namespaced_lease, name, namespace, body=options)
        except (ApiException, OSError):
            return
        finally:
            self._seen.pop((namespace, name), None)

    async def _create(self, api: Any, namespace: str, name: str) -> LeaseState:
        from kubernetes import client  # noqa: PLC0415

        now = _micro_now()
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=name, labels={"app.kubernetes.io/managed-by": "pgrecovery"}),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=max(1, int(self.duration)),
                acquire_time=now, renew_time=now, lease_transitions=0),
        )
        await asyncio.to_thread(api.create_namespaced_lease, namespace, body)
        return LeaseState(True, self.identity)

    async def _write(self, api: Any, namespace: str, name: str, lease: Any, *,
                     transitions: int) -> None:
        now = _micro_now()
        spec = lease.spec
        if transitions:
            spec.holder_identity = self.identity
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + transitions
        spec.lease_duration_seconds = max(1, int(self.duration))
        spec.renew_time = now
        # replace = PUT with the resourceVersion read: 409 if anyone wrote since.
        await asyncio.to_thread(api.replace_namespaced_lease, name, namespace, lease)


def _micro_now() -> datetime:
    return datetime.now(UTC)
