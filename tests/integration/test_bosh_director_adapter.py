"""pgrecovery's director client (pgrecovery.adapters.bosh_director) against the director
emulator over the simulated VMs: instances, an ephemeral user opened through `ssh setup` that
SSH reaches with the in-memory key and only the host key the director returned, `cleanup`
leaving no user behind, token renewal, basic auth, and each director error mapped."""

from __future__ import annotations

import pytest

from pgrecovery.adapters.bosh_director import (
    DirectorClient,
    DirectorCredentials,
    EphemeralKey,
    ssh_user_name,
)
from pgrecovery.adapters.ssh import SshAuth, SshEndpoint, SshGateway, SshPool
from pgrecovery.errors import (
    AuthenticationFailed,
    ClusterError,
    HostKeyMismatch,
    NodeUnreachable,
    SecretError,
)
from tests.boshdirector.director import READ_SCOPE, Client, DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID
from tests.boshdirector.tls import make_pki
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]


def _client(
    d: DirectorEmulator, *, secret: str | None = None, ca: str | None = None
) -> DirectorClient:
    return DirectorClient(
        d.url,
        ca if ca is not None else d.pki.ca_pem,
        DirectorCredentials(
            CLIENT_ID, secret if secret is not None else d.clients[CLIENT_ID].secret
        ),
    )


async def test_instances_setup_ssh_and_cleanup(
    bosh_director: DirectorEmulator, sim_cluster: SimCluster
) -> None:
    d, dep = bosh_director, sim_cluster.config.deployment
    client = _client(d)
    assert d.clients[CLIENT_ID].secret not in repr(client)
    insts = await client.instances(dep)
    assert [(i.name, i.address, i.process_state) for i in insts] == [
        (vm.name, vm.address, "running") for vm in sim_cluster.vms
    ]
    user = ssh_user_name("t3st1d")
    key = EphemeralKey.generate(user)
    assert "PRIVATE" not in repr(key)
    hosts = await client.ssh_setup(dep, "pg", user, key.public_openssh)
    assert [h.name for h in hosts] == [vm.name for vm in sim_cluster.vms]
    for h, vm in zip(hosts, sim_cluster.vms, strict=True):
        assert h.host_public_key == vm.rsa_host_key_public
    auth = SshAuth(
        username=user,
        private_key=key.private_openssh,
        known_hosts="".join(h.known_hosts_line() for h in hosts),
    )
    async with SshPool(auth) as pool:
        for h in hosts:
            res = await pool.run_root(SshEndpoint(h.name, h.ip), ["id", "-u"])
            assert res.stdout.strip() == "0"
    assert all(users == [user] for users in d.ssh_users(dep).values())
    await client.ssh_cleanup(dep, "pg", f"^{user}$")
    assert d.ssh_users(dep) == {vm.name: [] for vm in sim_cluster.vms}
    assert d.tokens_issued == 1  # one token for all of it


async def test_host_key_other_than_the_directors_is_refused(
    bosh_director: DirectorEmulator, sim_cluster: SimCluster
) -> None:
    d, dep = bosh_director, sim_cluster.config.deployment
    # The director says pg/1 has pg/0's key: the real pg/1 must then be refused.
    d.host_key_override["pg/1"] = sim_cluster.vm("pg/0").rsa_host_key_public
    user = ssh_user_name("hk0001")
    key = EphemeralKey.generate(user)
    client = _client(d)
    hosts = await client.ssh_setup(dep, "pg", user, key.public_openssh)
    auth = SshAuth(user, key.private_openssh, "".join(h.known_hosts_line() for h in hosts))
    async with SshPool(auth) as pool:
        h1 = next(h for h in hosts if h.name == "pg/1")
        with pytest.raises(HostKeyMismatch):
            await pool.run_root(SshEndpoint(h1.name, h1.ip), ["true"])
    await client.ssh_cleanup(dep, "pg", f"^{user}$")


async def test_token_is_renewed_before_it_expires(
    bosh_director: DirectorEmulator, sim_cluster: SimCluster
) -> None:
    d = bosh_director
    now = [1000.0]
    client = DirectorClient(
        d.url,
        d.pki.ca_pem,
        DirectorCredentials(CLIENT_ID, d.clients[CLIENT_ID].secret),
        clock=lambda: now[0],
    )
    await client.instances(sim_cluster.config.deployment)
    assert d.tokens_issued == 1
    now[0] += d.token_lifetime_s - 90  # still valid, not yet in the renewal margin
    await client.instances(sim_cluster.config.deployment)
    assert d.tokens_issued == 1
    now[0] += 40  # inside the last minute: renewed first
    await client.instances(sim_cluster.config.deployment)
    assert d.tokens_issued == 2


async def test_basic_auth_director(sim_cluster: SimCluster) -> None:
    with DirectorEmulator(
        {sim_cluster.config.deployment: sim_cluster.vms},
        clients={"admin": Client("pw-basic")},
        auth="basic",
    ) as d:
        client = DirectorClient(d.url, d.pki.ca_pem, DirectorCredentials("admin", "pw-basic"))
        assert len(await client.instances(sim_cluster.config.deployment)) == 3
        bad = DirectorClient(d.url, d.pki.ca_pem, DirectorCredentials("admin", "nope"))
        with pytest.raises(SecretError) as e:
            await bad.instances(sim_cluster.config.deployment)
        assert e.value.reason == "DirectorAuthenticationFailed"
        assert "nope" not in str(e.value)


async def test_director_errors_are_mapped(
    bosh_director: DirectorEmulator, sim_cluster: SimCluster
) -> None:
    d, dep = bosh_director, sim_cluster.config.deployment
    with pytest.raises(SecretError) as e:
        await _client(d, secret="wrong-secret").instances(dep)
    assert e.value.reason == "DirectorAuthenticationFailed"
    assert "Bad credentials" in str(e.value)
    assert "wrong-secret" not in str(e.value)
    with pytest.raises(SecretError) as e:
        await _client(d, ca=make_pki().ca_pem).instances(dep)
    assert e.value.reason == "DirectorCertificateUntrusted"
    with pytest.raises(ClusterError) as e:
        await _client(d).instances("no-such-dep")
    assert e.value.reason == "DirectorNotFound"
    assert "Deployment 'no-such-dep' doesn't exist" in str(e.value)
    d.ssh_task_error = "Action Failed ssh: Creating user: useradd exited 1"
    user = ssh_user_name("err001")
    with pytest.raises(ClusterError) as e:
        await _client(d).ssh_setup(dep, "pg", user, EphemeralKey.generate(user).public_openssh)
    assert e.value.reason == "DirectorTaskFailed"
    assert "useradd exited 1" in str(e.value)
    d.ssh_task_error = None
    with pytest.raises(ClusterError) as e:
        await _client(d).ssh_setup(
            dep, "nosuchgroup", user, EphemeralKey.generate(user).public_openssh
        )
    assert e.value.reason == "DirectorTaskFailed"
    assert "nosuchgroup" in str(e.value)
    d.clients["reader"] = Client("r", scopes=(READ_SCOPE,))
    reader = DirectorClient(d.url, d.pki.ca_pem, DirectorCredentials("reader", "r"))
    assert len(await reader.instances(dep)) == 3
    with pytest.raises(AuthenticationFailed) as e:
        await reader.ssh_setup(dep, "pg", user, EphemeralKey.generate(user).public_openssh)
    assert e.value.reason == "DirectorForbidden"
    assert d.ssh_users(dep) == {vm.name: [] for vm in sim_cluster.vms}


async def test_unreachable_gateway_is_retryable_gateway_unreachable(
    sim_cluster: SimCluster,
) -> None:
    """Nothing listens on port 1 of the host's bridge address: the jumpbox connection is
    refused, which maps to NodeUnreachable with reason GatewayUnreachable (retryable)."""
    key = EphemeralKey.generate("gw")
    host = sim_cluster.config.host_address
    gateway = SshGateway(
        host=host,
        port=1,
        user="jumpbox",
        private_key=key.private_openssh,
        known_hosts=f"[{host}]:1 {key.public_openssh}\n",
    )
    vm = sim_cluster.vm("pg/0")
    auth = SshAuth(
        username=sim_cluster.ssh_user,
        private_key=sim_cluster.client_key_path.read_bytes(),
        known_hosts=sim_cluster.known_hosts,
        gateway=gateway,
    )
    async with SshPool(auth) as pool:
        with pytest.raises(NodeUnreachable) as e:
            await pool.run_root(SshEndpoint(vm.name, vm.address), ["true"])
    assert e.value.reason == "GatewayUnreachable"
    assert e.value.retryable
