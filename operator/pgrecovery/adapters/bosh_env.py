"""Local mode from the bosh CLI's environment: someone with a working `bosh` shell runs
`pgrecovery recover` without writing addresses, keys or director details.

Why this module exists: `BOSH_ENVIRONMENT`, `BOSH_CLIENT`, `BOSH_CLIENT_SECRET`,
`BOSH_CA_CERT` (a path or the PEM itself), `BOSH_DEPLOYMENT` and the jumpbox variables
`BOSH_GW_HOST`/`BOSH_GW_USER`/`BOSH_GW_PRIVATE_KEY` or `BOSH_ALL_PROXY=ssh+socks5://user@host:port
?private-key=PATH` mean for pgrecovery what they mean for `bosh`. Unlike `bosh ssh`, the
jumpbox's host key is verified: against `BOSH_GW_KNOWN_HOSTS` (a path; pgrecovery's own
variable) or else ~/.ssh/known_hosts. A recovery file without `target.nodes`/`ssh`/`bosh`
gets a `target.bosh` that points at the reserved secret name `bosh-environment`, which
`BoshEnvSecrets` answers from those variables; every other secret is read as before. The
values stay in memory; nothing is written.

Environment aliases work as for `bosh`: `BOSH_ENVIRONMENT` may name an alias (or the URL) of an
environment in the CLI's config (`BOSH_CONFIG`, default ~/.bosh/config, written by `bosh
alias-env` and `bosh log-in`), which gives the director's URL and CA certificate, and the
client id and secret when they are stored there; the variables win over the file. A `bosh
log-in` *user* session (access and refresh tokens) is not used: pgrecovery authenticates as a
UAA client, and says so. The file format is the bosh CLI's (`cmd/config/fs_config.go`:
`environments: [{url, ca_cert, alias, username, password, access_token, refresh_token}]`).
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pgrecovery.adapters.kube import SecretKeyRefLike, SecretRefLike
from pgrecovery.errors import ConfigurationError, SecretError

BOSH_ENV_SECRET = "bosh-environment"  # noqa: S105 - a secret's name, not a secret
DEFAULT_DIRECTOR_PORT = 25555


def config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("BOSH_CONFIG") or "~/.bosh/config").expanduser()


def config_environment(value: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment of the bosh CLI's config whose alias or URL is `value`, if any."""
    path = config_path(environ)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the bosh config {path}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise ConfigurationError(f"the bosh config {path} is not YAML") from None
    for env in doc.get("environments") or []:
        if isinstance(env, dict) and value in (env.get("alias"), env.get("url")):
            return {k: str(v) for k, v in env.items() if isinstance(v, str | int)}
    return None


def director_url(value: str, environ: Mapping[str, str] | None = None) -> str:
    """`BOSH_ENVIRONMENT` as a URL: `10.0.0.6`, `10.0.0.6:25555`, `https://…`, or an alias of
    the bosh CLI's config."""
    value = value.strip()
    aliased = config_environment(value, environ if environ is not None else os.environ)
    if aliased is not None and aliased.get("url") and aliased.get("alias") == value:
        return director_url(aliased["url"], {})
    if value.startswith("https://"):
        return value.rstrip("/")
    if "://" in value:
        raise ConfigurationError(f"BOSH_ENVIRONMENT {value!r}: the director is reached over https")
    if not any(c in value for c in ".:") and value != "localhost":
        raise ConfigurationError(
            f"BOSH_ENVIRONMENT {value!r} is no address and no alias in "
            f"{config_path(environ if environ is not None else os.environ)} (`bosh alias-env "
            f"{value} -e https://DIRECTOR:25555 --ca-cert CA` makes it one)"
        )
    return f"https://{value}" if ":" in value else f"https://{value}:{DEFAULT_DIRECTOR_PORT}"


def apply_bosh_environment(spec: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`spec` with `target.bosh` (and `target.deployment`) from the bosh CLI's variables, when
    the target says nothing about how to reach the VMs and BOSH_ENVIRONMENT is set."""
    target = dict(spec.get("target") or {})
    if any(k in target for k in ("nodes", "ssh", "bosh")) or not environ.get("BOSH_ENVIRONMENT"):
        return spec
    if "deployment" not in target and environ.get("BOSH_DEPLOYMENT"):
        target["deployment"] = environ["BOSH_DEPLOYMENT"]
    target["bosh"] = {
        "director": director_url(environ["BOSH_ENVIRONMENT"], environ),
        "caCertSecretRef": {"name": BOSH_ENV_SECRET, "key": "ca"},
        "credentialsSecretRef": {"name": BOSH_ENV_SECRET},
    }
    gateway = gateway_from_env(environ)
    if gateway is not None:
        host, port, user, _key = gateway
        target["bosh"]["gateway"] = {
            "host": host,
            "port": port,
            "user": user,
            "privateKeySecretRef": {"name": BOSH_ENV_SECRET, "key": "gw-private-key"},
            "knownHostsSecretRef": {"name": BOSH_ENV_SECRET, "key": "gw-known-hosts"},
        }
    return {**spec, "target": target}


def gateway_from_env(environ: Mapping[str, str]) -> tuple[str, int, str, str] | None:
    """(host, port, user, private key path or PEM) from BOSH_ALL_PROXY or BOSH_GW_*."""
    proxy = environ.get("BOSH_ALL_PROXY", "")
    if proxy:
        parts = urllib.parse.urlsplit(proxy)
        key = urllib.parse.parse_qs(parts.query).get("private-key", [""])[-1]
        if parts.scheme != "ssh+socks5" or not parts.hostname or not parts.username or not key:
            raise ConfigurationError(
                "BOSH_ALL_PROXY must look like ssh+socks5://USER@HOST:PORT?private-key=PATH "
                "(other proxies are not supported)"
            )
        return parts.hostname, parts.port or 22, parts.username, key
    host = environ.get("BOSH_GW_HOST", "")
    if not host:
        return None
    key = environ.get("BOSH_GW_PRIVATE_KEY", "")
    if not key:
        raise ConfigurationError("BOSH_GW_HOST is set but BOSH_GW_PRIVATE_KEY is not")
    name, _, port = host.partition(":")
    return name, int(port or 22), environ.get("BOSH_GW_USER") or "vcap", key


class BoshEnvSecrets:
    """A secret source that answers `bosh-environment` from the bosh CLI's variables and
    everything else from `inner`."""

    def __init__(self, inner: Any, environ: Mapping[str, str] | None = None) -> None:
        self._inner = inner
        self._env = os.environ if environ is None else environ

    def _need(self, variable: str, stored: str | None = None) -> str:
        """The variable, else what the bosh config stores for the environment (`stored`:
        its key there)."""
        value = self._env.get(variable, "")
        if not value and stored is not None:
            value = self._stored().get(stored, "")
        if not value:
            where = (f" and not stored for it in {config_path(self._env)}"
                     if stored is not None and self._stored() else "")
            hint = ("; the bosh config holds a `bosh log-in` user session, which pgrecovery "
                    "does not use: set BOSH_CLIENT and BOSH_CLIENT_SECRET to a UAA client"
                    if stored in ("username", "password")
                    and self._stored().get("refresh_token") else "")
            raise SecretError(f"{variable} is not set{where} (target.bosh from the bosh "
                              f"environment){hint}")
        return value

    def _stored(self) -> dict[str, str]:
        """BOSH_ENVIRONMENT's entry in the bosh CLI's config ({} when there is none)."""
        value = self._env.get("BOSH_ENVIRONMENT", "")
        return (config_environment(value.strip(), self._env) or {}) if value else {}

    async def get_key(self, ref: SecretKeyRefLike) -> bytes:
        if ref.name != BOSH_ENV_SECRET:
            return bytes(await self._inner.get_key(ref))
        if ref.key == "ca":
            return await self._pem_or_path("BOSH_CA_CERT", self._need("BOSH_CA_CERT", "ca_cert"),
                                           "BEGIN")
        gateway = gateway_from_env(self._env)
        if ref.key == "gw-private-key" and gateway is not None:
            return await self._pem_or_path("the jumpbox key", gateway[3], "PRIVATE KEY")
        if ref.key == "gw-known-hosts" and gateway is not None:
            path = self._env.get("BOSH_GW_KNOWN_HOSTS") or str(Path.home() / ".ssh/known_hosts")
            return await self._pem_or_path("BOSH_GW_KNOWN_HOSTS", path, None)
        raise SecretError(f"{BOSH_ENV_SECRET} has no key {ref.key!r}")

    @staticmethod
    async def _pem_or_path(what: str, value: str, marker: str | None) -> bytes:
        """`value` itself when it contains `marker` (PEM text), else the file it names."""
        if marker is not None and marker in value:
            return value.encode()
        try:
            return await asyncio.to_thread(lambda: Path(value).expanduser().read_bytes())
        except OSError as exc:
            raise SecretError(f"{what}: cannot read {value}: {exc.strerror}") from None

    async def get_all(self, ref: SecretRefLike) -> Mapping[str, bytes]:
        if ref.name != BOSH_ENV_SECRET:
            return dict(await self._inner.get_all(ref))
        return {
            "client": self._need("BOSH_CLIENT", "username").encode(),
            "clientSecret": self._need("BOSH_CLIENT_SECRET", "password").encode(),
        }
