"""Reads Kubernetes Secrets referenced by a PgRecovery.

Why this module exists: secrets (encryption key, SSH key, known_hosts, cloud credentials) are
referenced by name in the spec and read only when a step needs them, with the operator's own
service account. This is the only module that imports the `kubernetes` client; its errors are
converted here into SecretError / RetryableError. Values are returned as bytes and never logged.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any, Protocol

from pgrecovery.errors import RetryableError, SecretError


class SecretRefLike(Protocol):
    """Structural view of the spec's secret references (adapters may not import the engine)."""

    @property
    def name(self) -> str: ...


class SecretKeyRefLike(SecretRefLike, Protocol):
    @property
    def key(self) -> str: ...


class KubeSecrets:
    """A `SecretSource` backed by the Kubernetes API, for one namespace."""

    def __init__(self, namespace: str, api: Any | None = None) -> None:
        self._namespace = namespace
        self._api = api

    def _core(self) -> Any:
        if self._api is None:
            from kubernetes import client, config  # noqa: PLC0415 - heavy import, only when used

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoreV1Api()
        return self._api

    async def _read(self, name: str) -> Mapping[str, bytes]:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            secret = await asyncio.to_thread(
                self._core().read_namespaced_secret, name, self._namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                raise SecretError(
                    f"Secret {self._namespace}/{name} does not exist; create it or fix the "
                    "reference in the PgRecovery spec"
                ) from None
            if exc.status in (401, 403):
                raise SecretError(
                    f"the operator may not read Secret {self._namespace}/{name} "
                    f"(HTTP {exc.status}); check its RBAC"
                ) from None
            raise RetryableError(
                f"reading Secret {self._namespace}/{name} failed with HTTP {exc.status}"
            ) from None
        except OSError as exc:
            raise RetryableError(f"Kubernetes API unreachable: {exc.__class__.__name__}") from None
        data = secret.data or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    async def get_key(self, ref: SecretKeyRefLike) -> bytes:
        data = await self._read(ref.name)
        if ref.key not in data:
            raise SecretError(
                f"Secret {self._namespace}/{ref.name} has no key {ref.key!r} "
                f"(it has: {', '.join(sorted(data)) or 'no keys'})"
            )
        return data[ref.key]

    async def get_all(self, ref: SecretRefLike) -> Mapping[str, bytes]:
        return await self._read(ref.name)
