"""Secrets for local mode: files laid out like a mounted Kubernetes Secret, or the environment.

Why this module exists: `pgrecovery recover` must run when Kubernetes is gone, with the same
recovery file. A reference `{name: a9s-pg-ssh, key: id_ed25519}` is read from
`<secrets-dir>/a9s-pg-ssh/id_ed25519` — the layout of a Secret volume mount, so a directory
copied from a cluster (or `kubectl get secret -o json` unpacked) works as is — or, when no such
file exists, from the environment variable `PGRECOVERY_SECRET_<NAME>_<KEY>` (upper case, every
character other than A-Z/0-9 replaced by `_`). Never from the command line.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from pgrecovery.adapters.kube import SecretKeyRefLike, SecretRefLike
from pgrecovery.errors import SecretError


def env_name(secret: str, key: str) -> str:
    return "PGRECOVERY_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{secret}_{key}".upper())


class LocalSecrets:
    def __init__(self, directory: Path | None, environ: Mapping[str, str] | None = None) -> None:
        self._dir = directory
        self._env = os.environ if environ is None else environ

    def _file(self, name: str, key: str) -> Path | None:
        if self._dir is None:
            return None
        path = self._dir / name / key
        return path if path.is_file() else None

    async def get_key(self, ref: SecretKeyRefLike) -> bytes:
        path = self._file(ref.name, ref.key)
        if path is not None:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and path.name != "known_hosts":
                # Refuse keys others can read, like ssh does: a leaked key file is a leak.
                raise SecretError(f"{path} is readable by others; chmod 600 it")
            return path.read_bytes()
        variable = env_name(ref.name, ref.key)
        if variable in self._env:
            return self._env[variable].encode()
        where = f"{self._dir / ref.name / ref.key} or " if self._dir else ""
        raise SecretError(
            f"secret {ref.name}/{ref.key} not found: put it in {where}the environment variable "
            f"{variable}"
        )

    async def get_all(self, ref: SecretRefLike) -> Mapping[str, bytes]:
        values: dict[str, bytes] = {}
        prefix = env_name(ref.name, "")
        for variable, value in self._env.items():
            if variable.startswith(prefix):
                values[variable[len(prefix) :]] = value.encode()
        if self._dir is not None and (self._dir / ref.name).is_dir():
            for path in sorted((self._dir / ref.name).iterdir()):
                if path.is_file():
                    values[path.name] = path.read_bytes()
        if not values:
            raise SecretError(
                f"secret {ref.name} not found: create the directory "
                f"{(self._dir or Path('<secrets-dir>')) / ref.name} or set {prefix}<KEY> variables"
            )
        return values
