"""The VMs of a recovery found and opened through the BOSH director (`spec.target.bosh`).

Why this module exists: with a director, a recovery carries no addresses and no SSH key. Each
phase run discovers the instances of the group (read-only), checks them against what Fetching
pinned in status (`facts.boshInstances`: name, instance id, address), removes users a crashed
earlier run of the same recovery left (`^bosh_pgrecovery_<uid>`), opens an ephemeral user with
a fresh in-memory key (`ssh setup`), and trusts for each VM only the host key the director
returned. `close()` removes the user again (`ssh cleanup`); the plan registers it as a closer,
so it runs when the phase run ends — succeeded, failed or stopped for deletion.

A VM that changed identity or address since Fetching is a failure, never a silent switch: the
pinned primary and standbys are the ones the earlier phases worked on.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field

from pgrecovery.adapters.bosh_director import (
    USER_PREFIX,
    DirectorClient,
    DirectorCredentials,
    DirectorInstance,
    EphemeralKey,
    ssh_user_name,
)
from pgrecovery.adapters.ssh import SshAuth, SshGateway
from pgrecovery.cluster.nodes import Node
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import SecretSource
from pgrecovery.engine.spec import BoshTarget
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import ClusterError, RecoveryError, SecretError

log = logging.getLogger(__name__)

PINNED_FACT = "boshInstances"


def run_prefix(uid: str) -> str:
    """The part of every ephemeral user name that is the same for one recovery."""
    return uid.replace("-", "")[:8].lower()


@dataclass
class BoshAccess:
    """Discovery and ephemeral SSH access for one phase run of one recovery."""

    bosh: BoshTarget
    deployment: str
    uid: str
    secrets: SecretSource
    _client: DirectorClient | None = None
    _user: str | None = None
    instances: tuple[DirectorInstance, ...] = field(default=())

    async def client(self) -> DirectorClient:
        if self._client is None:
            ca = (await self.secrets.get_key(self.bosh.ca_cert_secret_ref)).decode()
            values = await self.secrets.get_all(self.bosh.credentials_secret_ref)
            name = self.bosh.credentials_secret_ref.name
            try:
                client = values["client"].decode().strip()
                secret = values["clientSecret"].decode().strip()
            except KeyError as exc:
                raise SecretError(
                    f"Secret {name} needs keys client and clientSecret (missing {exc.args[0]})"
                ) from None
            self._client = DirectorClient(
                self.bosh.director, ca, DirectorCredentials(client, secret)
            )
        return self._client

    async def discover(self, status: RecoveryStatus | None) -> tuple[DirectorInstance, ...]:
        """The group's instances, all running; the same as pinned in `status` if it has a pin."""
        group = self.bosh.instance_group
        everything = await (await self.client()).instances(self.deployment)
        found = tuple(i for i in everything if i.group == group)
        if not found:
            groups = sorted({i.group for i in everything}) or ["none"]
            raise ClusterError(
                f"the director lists no instance of group '{group}' in deployment "
                f"'{self.deployment}' (groups there: {', '.join(groups)}); check "
                "target.bosh.instanceGroup",
                reason="DirectorNotFound",
            )
        # Before anything destructive every VM must be running; later the recovery itself stops
        # processes (standbys in Staging), so only identity and address are checked then.
        must_run = status is not None and status.phase is Phase.FETCHING
        for i in found:
            if not i.address or (must_run and i.process_state != "running"):
                raise ClusterError(
                    f"instance {i.name} ({i.id}) of deployment '{self.deployment}' is "
                    f"'{i.process_state or 'unknown'}' according to the director, not running "
                    f"(bosh -d {self.deployment} instances); nothing was changed",
                    reason="InstanceNotRunning",
                )
        pinned = (status.facts.get(PINNED_FACT) if status is not None else None) or ""
        if pinned:
            want = json.loads(pinned)
            have = _pin(found)
            if have != want:
                raise ClusterError(
                    f"the instances of '{self.deployment}/{group}' changed since Fetching "
                    f"pinned them: was {_describe(want)}, now {_describe(have)}; the director "
                    "recreated a VM. pgrecovery does not switch VMs in the middle of a recovery: "
                    "check the cluster and start a new PgRecovery",
                    reason="InstanceChanged",
                )
        self.instances = found
        return found

    async def open(
        self, ctx: StepContext | None, status: RecoveryStatus | None
    ) -> tuple[SshAuth, tuple[Node, ...]]:
        """Discover (and pin, the first time), remove stale users, open a user for this run."""
        gateway = await self._gateway()
        status = ctx.status if ctx is not None else status
        found = await self.discover(status)
        if ctx is not None and PINNED_FACT not in ctx.status.facts:
            await ctx.fact(**{PINNED_FACT: json.dumps(_pin(found), separators=(",", ":"))})
        client = await self.client()
        group = self.bosh.instance_group
        prefix = USER_PREFIX + run_prefix(self.uid)
        # Users of a crashed earlier run of this recovery (same uid prefix).
        await client.ssh_cleanup(self.deployment, group, f"^{prefix}")
        user = ssh_user_name(run_prefix(self.uid) + secrets.token_hex(2))
        key = EphemeralKey.generate(user)
        self._user = user  # from here on close() removes it, even if setup fails half-way
        hosts = await client.ssh_setup(self.deployment, group, user, key.public_openssh)
        by_name = {i.name: i for i in found}
        nodes = []
        for h in hosts:
            inst = by_name.get(h.name)
            if inst is None or h.ip not in inst.ips or h.id != inst.id:
                listed = f"{inst.id}, {inst.address}" if inst else "no such instance"
                raise ClusterError(
                    f"the director opened {h.name} ({h.id}, {h.ip}) but listed it as ({listed})",
                    reason="InstanceChanged",
                )
            nodes.append(Node(name=h.name, address=h.ip))
        if {n.name for n in nodes} != set(by_name):
            raise ClusterError(
                f"ssh setup opened {sorted(n.name for n in nodes)} of {sorted(by_name)}",
                reason="DirectorTaskFailed",
            )
        known_hosts = "".join(h.known_hosts_line() for h in hosts)
        log.info(
            "director %s opened %s as %s (host keys from the director)%s",
            self.bosh.director,
            ", ".join(n.name for n in nodes),
            user,
            f", through {gateway.label}" if gateway else "",
        )
        auth = SshAuth(
            username=user,
            private_key=key.private_openssh,
            known_hosts=known_hosts,
            gateway=gateway,
        )
        return auth, tuple(sorted(nodes, key=lambda n: n.name))

    async def _gateway(self) -> SshGateway | None:
        """The jumpbox of `target.bosh.gateway`, its key and known_hosts from Secrets."""
        gw = self.bosh.gateway
        if gw is None:
            return None
        key = await self.secrets.get_key(gw.private_key_secret_ref)
        known = await self.secrets.get_key(gw.known_hosts_secret_ref)
        return SshGateway(
            host=gw.host, user=gw.user, port=gw.port, private_key=key, known_hosts=known.decode()
        )

    async def close(self) -> None:
        """Remove this run's user from every VM of the group (waits for the director)."""
        if self._user is None or self._client is None:
            return
        user, self._user = self._user, None
        try:
            await self._client.ssh_cleanup(self.deployment, self.bosh.instance_group, f"^{user}$")
        except RecoveryError as exc:
            # The plan's close swallows errors; say here what stays behind. The next run of
            # this recovery removes it (its users share the prefix), or `bosh ssh` cleanup.
            log.warning(
                "ephemeral user %s may remain on %s/%s: ssh cleanup failed: %s",
                user,
                self.deployment,
                self.bosh.instance_group,
                exc,
            )
            raise
        log.info("director removed ephemeral user %s", user)


def _pin(instances: tuple[DirectorInstance, ...]) -> list[list[str]]:
    return [[i.name, i.id, i.address] for i in sorted(instances, key=lambda i: i.name)]


def _describe(pin: list[list[str]]) -> str:
    return ", ".join(f"{name} {iid[:8]} {addr}" for name, iid, addr in pin)
