"""Dingo cell operations against a fake shell: what is run, and what is refused.

The integration tests run these on the simulated cell; here the edges that the cell cannot
easily produce: credentials in `docker inspect` are dropped, two containers of one instance are
ambiguous, a container of another instance is refused, a data directory near the root is never
wiped, a running container is never wiped, etcd endpoints and keys are validated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from pgrecovery.adapters.ssh import CommandResult, SshEndpoint
from pgrecovery.cluster.dingo import DingoOperations, etcd_base_url
from pgrecovery.cluster.nodes import Node
from pgrecovery.errors import ClusterError, InvalidSpec

pytestmark = pytest.mark.unit

NEW = "ca5a7d15-1422-4408-a00d-93194350a106"
OTHER = "6e101b27-ee1b-4f4d-a032-4401a3709ec3"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _doc(ident: str, name: str, scope: str, *, running: bool = True, source: str = "") -> dict:
    return {
        "Id": ident,
        "Name": "/" + name,
        "State": {"Running": running, "ExitCode": 0},
        "Config": {
            "Env": [
                f"PATRONI_SCOPE={scope}",
                "ETCD_HOST_PORT=10.0.0.5:4001",
                "AWS_ACCESS_KEY_ID=AKIAEXAMPLE",
                f"AWS_SECRET_ACCESS_KEY={SECRET}",
            ]
        },
        "Mounts": [
            {
                "Source": source or f"/var/vcap/store/docker/volumes/{name}/data",
                "Destination": "/data",
            }
        ],
        "HostConfig": {"PortBindings": {"5432/tcp": [{"HostPort": "32768"}]}},
    }


@dataclass
class FakeShell:
    """Answers `docker ps` / `docker inspect` from `docs`; records every argv."""

    docs: list[dict]
    calls: list[list[str]] = field(default_factory=list)

    async def run_root(
        self,
        node: SshEndpoint,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        del node, input, timeout, check
        argv = list(argv)
        self.calls.append(argv)
        if "ps" in argv:
            lines = [f"{d['Id']} {d['Name'].lstrip('/')}" for d in self.docs]
            return CommandResult(0, "\n".join(lines) + "\n", "")
        if "inspect" in argv:
            refs = argv[argv.index("inspect") + 1 :]
            found = [d for d in self.docs if d["Id"] in refs or d["Name"][1:] in refs]
            return CommandResult(0, json.dumps(found), "")
        return CommandResult(0, "", "")

    def stream_root_lines(
        self, node: SshEndpoint, argv: Sequence[str], *, timeout: float | None = None
    ) -> AsyncIterator[str]:
        raise NotImplementedError

    async def upload(self, *args: object, **kwargs: object) -> object:
        raise NotImplementedError


CELL = Node(name="cell/0", address="10.0.0.20")


def _ops(*docs: dict) -> tuple[DingoOperations, FakeShell]:
    shell = FakeShell(list(docs))
    return DingoOperations(shell, [CELL]), shell  # type: ignore[arg-type]


async def test_container_is_found_by_instance_and_credentials_are_dropped() -> None:
    ops, shell = _ops(_doc("a" * 64, "cf-one", OTHER), _doc("b" * 64, "cf-two", NEW))
    container = await ops.find_container(NEW)
    assert container.name == "cf-two"
    assert container.host_port == 32768
    assert container.etcd_host_port == "10.0.0.5:4001"
    assert container.data_dir == "/var/vcap/store/docker/volumes/cf-two/data"
    assert SECRET not in repr(container)
    assert shell.calls[0][:3] == ["/var/vcap/packages/docker/bin/docker", "--host",
                                  "unix:///var/vcap/sys/run/docker/docker.sock"]  # fmt: skip
    assert etcd_base_url(container, None) == "http://10.0.0.5:4001"
    assert etcd_base_url(container, "http://10.0.0.6:2379") == "http://10.0.0.6:2379"
    with pytest.raises(InvalidSpec):
        etcd_base_url(container, "http://10.0.0.6:2379/v2/keys")


async def test_ambiguous_missing_and_foreign_containers_are_refused() -> None:
    ops, _ = _ops(_doc("a" * 64, "cf-one", NEW), _doc("b" * 64, "cf-two", NEW))
    with pytest.raises(ClusterError) as info:
        await ops.find_container(NEW)
    assert info.value.reason == "ContainerAmbiguous"
    assert (await ops.find_container(NEW, "cf-two")).name == "cf-two"
    ops, _ = _ops(_doc("a" * 64, "cf-one", OTHER))
    with pytest.raises(ClusterError) as info:
        await ops.find_container(NEW)
    assert info.value.reason == "ContainerNotFound"
    with pytest.raises(ClusterError) as info:
        await ops.find_container(NEW, "cf-one")
    assert info.value.reason == "ContainerMismatch"
    with pytest.raises(InvalidSpec):
        await ops.find_container(NEW, "cf-one; rm -rf /")
    with pytest.raises(InvalidSpec):
        await ops.find_container("NOT-A-GUID")


@pytest.mark.parametrize("source", ["/", "/var", "/var/vcap", "/data/../etc/x", "/a b/c/d"])
async def test_wipe_refuses_paths_near_the_root_or_odd(source: str) -> None:
    ops, shell = _ops(_doc("a" * 64, "cf-one", NEW, running=False, source=source))
    container = await ops.find_container(NEW)
    with pytest.raises((ClusterError, ValueError)):
        await ops.wipe_data_dir(container)
    assert not any("find" in " ".join(c) for c in shell.calls)


async def test_wipe_refuses_a_running_container_and_quotes_the_path() -> None:
    ops, shell = _ops(_doc("a" * 64, "cf-one", NEW, running=True))
    container = await ops.find_container(NEW)
    with pytest.raises(ClusterError, match="is running"):
        await ops.wipe_data_dir(container)
    ops, shell = _ops(_doc("a" * 64, "cf-one", NEW, running=False))
    await ops.wipe_data_dir(await ops.find_container(NEW))
    wipe = shell.calls[-1]
    # the path travels as a positional argument of a constant script, never inside it
    assert wipe[-1] == "/var/vcap/store/docker/volumes/cf-one/data"
    assert "/var/vcap/store" not in wipe[-3]


async def test_etcd_keys_are_validated() -> None:
    ops, _ = _ops(_doc("a" * 64, "cf-one", NEW))
    container = await ops.find_container(NEW)
    with pytest.raises(ValueError, match="etcd key"):
        await ops.etcd_delete(container, "http://10.0.0.5:4001", "../../other/initialize")
