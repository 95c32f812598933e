"""What the end-to-end tests drive and inspect: the emulator, kubectl, kopf operators.

Plain classes without pytest fixtures (those are in `fixtures.py`), so test modules can import
them for type hints and helpers:

- `KubeAPI`: a running emulator — URL, kubeconfigs per user, the request log, raw API calls,
  thread-safe reads of stored objects, and the kmock handler for fault injection.
- `Kubectl`: the real `/usr/bin/kubectl` with a kubeconfig and a private discovery cache.
- `KopfProcess`: a real `kopf run` subprocess (start / stop / SIGKILL / log).
- `KopfInProcess`: kopf's `KopfRunner` in a thread of the test process.
- `wait_for`: poll until something is true or fail the test.

Each operator gets its own user (bearer token), so the request log tells its calls apart from
the test's own kubectl calls; an operator counts as ready once the emulator has received its
watch request for each resource it was told to watch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.kubeapi.server import EmulatorThread, KubeAPIEmulator, RequestRecord, write_kubeconfig

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
TOY_CRD = Path(__file__).with_name("toy_crd.yaml")
_T = TypeVar("_T")


def wait_for(fn: Callable[[], _T | None], *, timeout: float = 30.0, interval: float = 0.1,
             message: str = "condition") -> _T:
    """Poll `fn` until it returns something truthy; return that, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# kopf log lines that mean something went wrong between the operator and the API (as opposed
# to a handler's own TemporaryError, which kopf logs as an ERROR too).
_PROBLEM = re.compile(r"\[(WARNING|ERROR|CRITICAL) *\]|Traceback \(most recent call last\)")


def log_problems(text: str, allowed: Sequence[str] = ("failed temporarily",)) -> list[str]:
    """Warnings, errors and tracebacks in a kopf log, minus lines containing `allowed`."""
    return [line for line in text.splitlines()
            if _PROBLEM.search(line) and not any(ok in line for ok in allowed)]


@dataclasses.dataclass
class KubeAPI:
    """A running emulator as a test sees it."""

    server: EmulatorThread
    kubeconfig: Path
    directory: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def emulator(self) -> KubeAPIEmulator:
        """The kmock handler: add fault-injecting reactions with kmock's DSL on it."""
        assert self.server.emulator is not None
        return self.server.emulator

    def user_kubeconfig(self, user: str, namespace: str = "default") -> Path:
        """A kubeconfig whose requests the emulator records under `user`."""
        return write_kubeconfig(self.directory / f"kubeconfig-{user}", self.url, user=user,
                                namespace=namespace)

    def records(self, *, since: int = 0, **match: Any) -> list[RequestRecord]:
        """Requests received (from index `since`), filtered by RequestRecord fields."""
        return [r for r in self.emulator.records[since:]
                if all(getattr(r, key) == value for key, value in match.items())]

    def mark(self) -> int:
        """An index for `records(since=…)`: only what arrives after this call."""
        return len(self.emulator.records)

    def wait_for_request(self, *, since: int = 0, timeout: float = 30.0,
                         **match: Any) -> RequestRecord:
        found = wait_for(lambda: self.records(since=since, **match), timeout=timeout,
                         message=f"a request matching {match}")
        return found[0]

    def get_object(self, group: str, plural: str, namespace: str | None,
                   name: str) -> dict[str, Any] | None:
        """The stored object (a copy), read safely from the emulator's thread."""
        return self.server.call(lambda: self.emulator.get_object(group, plural, namespace, name))

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", user: str = "admin",
                accept: str = "application/json") -> tuple[int, Any]:
        """A raw API call (status code, decoded JSON body) for checks below kubectl's level."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={  # noqa: S310
            "Content-Type": content_type, "Accept": accept, "Authorization": f"Bearer {user}",
        })
        try:
            with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            payload = e.read()
            status = e.code
        return status, json.loads(payload) if payload else None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST an object given as a dict (a manifest), failing the test on any error."""
        api_version = str(obj["apiVersion"])
        namespace = (obj.get("metadata") or {}).get("namespace")
        plural = _plural_of(self, api_version, str(obj["kind"]))
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        status, created = self.request("POST", f"{base}{scope}/{plural}", dict(obj))
        if status != 201:
            pytest.fail(f"creating {obj['kind']} failed with {status}: {created}")
        return dict(created)

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def install_crd(self, path: Path = TOY_CRD) -> dict[str, Any]:
        return self.create(yaml.safe_load(path.read_text(encoding="utf-8")))


def _plural_of(api: KubeAPI, api_version: str, kind: str) -> str:
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    status, listing = api.request("GET", base)
    if status == 200:
        for entry in listing["resources"]:
            if entry["kind"] == kind and "/" not in entry["name"]:
                return str(entry["name"])
    pytest.fail(f"the emulator does not serve {kind} in {api_version}")


@dataclasses.dataclass
class Kubectl:
    """The real kubectl pointed at the emulator.

    kubectl caches discovery in `cache_dir` as it does for a real cluster: `get` notices new
    types by itself, but after a CRD was created other than through this kubectl, `explain`
    needs a `kubectl("api-resources")` first.
    """

    kubeconfig: Path
    cache_dir: Path
    namespace: str | None = None
    timeout: float = 120.0

    def __call__(self, *args: str, input: str | None = None,
                 timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        command = [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir",
                   str(self.cache_dir)]
        if self.namespace is not None:
            command += ["--namespace", self.namespace]
        return subprocess.run(
            [*command, *args], input=input, capture_output=True, text=True,
            timeout=timeout if timeout is not None else self.timeout, check=False,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )

    def apply(self, yaml_text: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self("apply", "-f", "-", *args, input=yaml_text)

    def get(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self("get", *args)

    def wait(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self("wait", *args)

    def delete(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self("delete", *args)

    def json(self, *args: str) -> Any:
        """`kubectl get … -o json`, decoded; fails the test if kubectl fails."""
        result = self("get", *args, "-o", "json")
        if result.returncode != 0:
            pytest.fail(f"kubectl get {' '.join(args)} failed: {result.stderr}")
        return json.loads(result.stdout)


def _operator_env(kubeconfig: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    # The package is `pgrecovery` under the `operator/` source root; tests import as `tests.…`.
    paths = [str(REPO_ROOT), str(REPO_ROOT / "operator")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": os.pathsep.join(paths),
           "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


class RecordingAPI(Protocol):
    """What `KopfProcess` needs of an API server: the emulator (`KubeAPI`) or the real one
    (`tests.realkube.server.RealKubeAPI`, whose request log is its audit log)."""

    def user_kubeconfig(self, user: str, namespace: str = "default") -> Path: ...

    def mark(self) -> int: ...

    def records(self, *, since: int = 0, **match: Any) -> list[RequestRecord]: ...


def wait_watching(api: RecordingAPI, *, user: str, namespace: str, since: int,
                   resources: Sequence[str], timeout: float,
                   alive: Callable[[], bool]) -> None:
    def ready() -> bool:
        if not alive():
            pytest.fail(f"the operator ({user}) exited before it started watching")
        return all(api.records(since=since, user=user, verb="watch", resource=plural,
                               namespace=namespace) for plural in resources)

    wait_for(ready, timeout=timeout, message=f"{user} to watch {list(resources)} in {namespace}")


class KopfProcess:
    """A real `kopf run` subprocess against the emulator."""

    def __init__(self, api: RecordingAPI, module: str, *, namespace: str, user: str,
                 log_path: Path, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 watching: Sequence[str] = (), ready_timeout: float = 60.0,
                 kubeconfig: Path | None = None) -> None:
        """`kubeconfig`: given, the operator speaks with it (e.g. a ServiceAccount token) and
        `user` must be the name the server records for it; else one is made for `user`."""
        self.api = api
        self.module = module
        self.namespace = namespace
        self.user = user
        self.log_path = log_path
        self.kubeconfig = kubeconfig or api.user_kubeconfig(user, namespace)
        self.env = _operator_env(self.kubeconfig, env)
        self.args = list(args)
        self.watching = tuple(watching)
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "kopf", "run", "-m", self.module, "--namespace",
                self.namespace, "--standalone", "--verbose", *self.args]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("the operator is already running")
        self.starts += 1
        since = self.api.mark()
        with self.log_path.open("ab") as log:
            log.write(f"\n===== kopf start #{self.starts}: {' '.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        if self.watching:
            wait_watching(self.api, user=self.user, namespace=self.namespace, since=since,
                           resources=self.watching, timeout=self.ready_timeout,
                           alive=lambda: self.running)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (kopf stops gracefully), SIGKILL if it takes longer than `timeout`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the operator dies mid-work, as in a node loss or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") \
            if self.log_path.exists() else ""


class KopfInProcess:
    """kopf's `KopfRunner` (a thread of the test process) against the emulator."""

    def __init__(self, runner: KopfRunner, user: str) -> None:
        self.runner = runner
        self.user = user
        self.stopped = False

    def stop(self) -> None:
        """Stop the operator (takes a few seconds); re-raises what crashed it."""
        if not self.stopped:
            self.stopped = True
            self.runner.__exit__(None, None, None)

    @property
    def output(self) -> str:
        """Everything the operator logged; available after stop()."""
        return str(self.runner.output)
