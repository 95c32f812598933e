"""Local mode from the bosh CLI's environment: someone with a working `bosh` shell runs
`pgrecovery recover` without writing addresses, keys or director details.

Why this module exists: `BOSH_ENVIRONMENT`, `BOSH_CLIENT`, `BOSH_CLIENT_SECRET`,
`BOSH_CA_CERT` (a path or the PEM itself) and `BOSH_DEPLOYMENT` mean for pgrecovery what they
mean for `bosh`. A recovery file without `target.nodes`/`ssh`/`bosh` gets a `target.bosh` that
points at the reserved secret name `bosh-environment`, which `BoshEnvSecrets` answers from those
variables; every other secret is read as before. The values stay in memory; nothing is
written. Environment aliases from ~/.bosh/config and `BOSH_ALL_PROXY`/`BOSH_GW_*` (jumpbox) are
not supported in this version and say so instead of being ignored.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgrecovery.adapters.kube import SecretKeyRefLike, SecretRefLike
from pgrecovery.errors import ConfigurationError, SecretError

BOSH_ENV_SECRET = "bosh-environment"  # noqa: S105 - a secret's name, not a secret
DEFAULT_DIRECTOR_PORT = 25555


def director_url(value: str) -> str:
    """`BOSH_ENVIRONMENT` as a URL: `10.0.0.6`, `10.0.0.6:25555` or `https://…`."""
    value = value.strip()
    if value.startswith("https://"):
        return value.rstrip("/")
    if "://" in value:
        raise ConfigurationError(f"BOSH_ENVIRONMENT {value!r}: the director is reached over https")
    if not any(c in value for c in ".:") and value != "localhost":
        raise ConfigurationError(
            f"BOSH_ENVIRONMENT {value!r} looks like an alias from ~/.bosh/config; pgrecovery "
            "needs the director's address (e.g. https://10.0.0.6:25555)"
        )
    return f"https://{value}" if ":" in value else f"https://{value}:{DEFAULT_DIRECTOR_PORT}"


def apply_bosh_environment(spec: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`spec` with `target.bosh` (and `target.deployment`) from the bosh CLI's variables, when
    the target says nothing about how to reach the VMs and BOSH_ENVIRONMENT is set."""
    target = dict(spec.get("target") or {})
    if any(k in target for k in ("nodes", "ssh", "bosh")) or not environ.get("BOSH_ENVIRONMENT"):
        return spec
    unsupported = [v for v in ("BOSH_ALL_PROXY", "BOSH_GW_HOST") if environ.get(v)]
    if unsupported:
        raise ConfigurationError(
            f"{', '.join(unsupported)} set: a gateway (jumpbox) is not supported in this version"
        )
    if "deployment" not in target and environ.get("BOSH_DEPLOYMENT"):
        target["deployment"] = environ["BOSH_DEPLOYMENT"]
    target["bosh"] = {
        "director": director_url(environ["BOSH_ENVIRONMENT"]),
        "caCertSecretRef": {"name": BOSH_ENV_SECRET, "key": "ca"},
        "credentialsSecretRef": {"name": BOSH_ENV_SECRET},
    }
    return {**spec, "target": target}


class BoshEnvSecrets:
    """A secret source that answers `bosh-environment` from the bosh CLI's variables and
    everything else from `inner`."""

    def __init__(self, inner: Any, environ: Mapping[str, str] | None = None) -> None:
        self._inner = inner
        self._env = os.environ if environ is None else environ

    def _need(self, variable: str) -> str:
        value = self._env.get(variable, "")
        if not value:
            raise SecretError(f"{variable} is not set (target.bosh from the bosh environment)")
        return value

    async def get_key(self, ref: SecretKeyRefLike) -> bytes:
        if ref.name != BOSH_ENV_SECRET:
            return bytes(await self._inner.get_key(ref))
        if ref.key != "ca":
            raise SecretError(f"{BOSH_ENV_SECRET} has no key {ref.key!r}")
        value = self._need("BOSH_CA_CERT")
        if "BEGIN CERTIFICATE" in value:
            return value.encode()
        try:
            return await asyncio.to_thread(Path(value).read_bytes)
        except OSError as exc:
            raise SecretError(f"BOSH_CA_CERT: cannot read {value}: {exc.strerror}") from None

    async def get_all(self, ref: SecretRefLike) -> Mapping[str, bytes]:
        if ref.name != BOSH_ENV_SECRET:
            return dict(await self._inner.get_all(ref))
        return {
            "client": self._need("BOSH_CLIENT").encode(),
            "clientSecret": self._need("BOSH_CLIENT_SECRET").encode(),
        }
