"""A Kubernetes API server emulator that a real `kopf run` and the real `kubectl` work against.

Why it exists: no kube-apiserver can be installed on the machines the tests run on, yet the
operator must be proven end to end — handlers chained through status changes, resumption after a
SIGKILL, finalizers, Events, `kubectl apply/get/wait/delete`. `kmock` (by kopf's author) is the
base: its `KubernetesScaffold` handler gives us the aiohttp request plumbing, every request
recorded and filterable with its DSL, and fault injection for free (`emulator[...] << 500`).
Its `KubernetesEmulator` state machine is not used: it is a dict-merge store without resource
versions, generations, status subresources, generateName, selectors, consistent watches or
finalizer-aware deletion, and kopf relies on all of them. This module adds those semantics and
the discovery, Table and OpenAPI endpoints kubectl needs.

Semantics kept faithful to a real server (each was a reason a kopf operator behaves differently):

- `metadata.resourceVersion` is one global counter; every change bumps it and is an event in a
  bounded history, so a watch resumed from a list's resourceVersion misses nothing and a
  too-old one gets `ERROR 410` (kopf then re-lists). No-op writes change nothing and emit
  nothing. `uid`, `creationTimestamp` and `generation` are maintained; `generation` grows when
  anything but metadata (and status, where status is a subresource) changes, and when deletion
  starts, as on a real server.
- CRD `subresources.status`: writes to the main resource keep the old status (also on create),
  writes to `/status` change only status. kopf discovers the subresource and patches `/status`.
- Deletion: with finalizers the object gets `deletionTimestamp` and lives on; it vanishes when
  the last finalizer is removed. No new finalizers once deletion started. Namespaces terminate
  with their contents; deleting a CRD deletes its objects (without waiting for their finalizers:
  a simplification).
- Watches: `resourceVersion`, `timeoutSeconds`, `allowWatchBookmarks` (a BOOKMARK every
  `bookmark_interval` seconds of silence), `sendInitialEvents`, label and field selectors.
- Optimistic concurrency: PUT with a stale resourceVersion → 409; PUT of a custom resource
  without one → 422; a merge patch carrying a resourceVersion is a precondition; a failed
  JSON-patch `test` → 422 (kopf's finalizer patches depend on this).
- Names: `generateName` (kopf names its Events so), DNS-subdomain validation, 409 on duplicates,
  objects only in existing, non-terminating namespaces.

Protobuf request bodies, which kubectl's typed clients send for `kubectl create secret|configmap|
namespace|serviceaccount`, are decoded for those kinds (`protobuf.py`); responses are JSON.

Not emulated (tests must not rely on them): admission, RBAC enforcement (requests are recorded
so a test can check what the operator needs instead), schema validation and defaulting (validate
CRDs and samples offline, see the test-environment notes), server-side apply, garbage collection
through ownerReferences, aggregated discovery, `kubectl explain` (no schemas are served),
`kubectl auth can-i` (no SelfSubjectAccessReview), pod logs/exec, other protobuf bodies.

Three ways to run it, all serving plain HTTP on 127.0.0.1 (kubectl and kopf accept a plain-HTTP
server in a kubeconfig, so no TLS is needed):

- `EmulatorThread`: a background thread with its own event loop, for sync and async tests alike.
- `serve()`: an async context manager inside an existing event loop.
- `python -m tests.kubeapi --port N`: a separate process (prints `KUBEAPI_URL=…` when ready).

Inspecting traffic: `emulator.records` (in-process) or `GET /_emulator/requests` (any mode) lists
every request as `RequestRecord` — verb, group, resource, subresource, namespace, name, user (the
bearer token, so each kopf operator can have its own identity; kubectl sends no token over plain
HTTP, so its requests show as `system:anonymous` with a `kubectl/…` user agent), user agent and
status code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import StreamingError  # kmock-internal: pinned kmock==0.8
from typing_extensions import override

from tests.kubeapi import patches, protobuf, resources, selectors, tables
from tests.kubeapi.resources import ResourceType

_T = TypeVar("_T")

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0+pgrecovery.emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# Namespaces every real cluster has; "default" is where kubectl puts things without -n.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The alphabet of apiserver's generateName suffixes (no vowels, no confusable digits).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# System metadata a client cannot change through PUT or PATCH.
_SYSTEM_METADATA = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "generation", "resourceVersion", "selfLink")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An expected API failure, rendered as a `v1 Status` (not an emulator malfunction)."""

    def __init__(self, code: int, reason: str, message: str,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified_name} "{name}" not found',
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def _invalid(rtype: ResourceType, name: str, message: str) -> ApiError:
    return ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group or "core"} "{name}" is invalid: '
                    f"{message}", {"name": name, "group": rtype.group, "kind": rtype.kind})


def _conflict(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.qualified_name} '
                    f'"{name}": the object has been modified; please apply your changes to the '
                    f"latest version and try again",
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


_NO_RESOURCE = ApiError(404, "NotFound", "the server could not find the requested resource")


@dataclasses.dataclass
class RequestRecord:
    """One request as an RBAC rule would see it (plus who sent it and how it ended)."""

    verb: str  # get list watch create update patch delete deletecollection; or the HTTP method
    group: str | None  # None for non-resource URLs (discovery, /version, /openapi)
    version: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    path: str
    params: dict[str, str]  # the query: resourceVersion, labelSelector, fieldSelector, …
    user: str
    user_agent: str
    status: int = 0  # 0 while a watch stream is open and before the response

    def rbac(self) -> tuple[str, str | None, str | None, str | None, str | None]:
        return (self.verb, self.group, self.resource, self.subresource, self.namespace)


@dataclasses.dataclass(frozen=True)
class _ApiPath:
    group: str
    version: str
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None


def _parse_path(path: str) -> _ApiPath | None:
    parts = [part for part in path.strip("/").split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    # /api/v1/namespaces/{ns}/{plural}/… is namespaced; /api/v1/namespaces/{name}[/status]
    # is the Namespace object itself.
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return _ApiPath(group, version, plural, namespace, name, subresource)


def _verb(method: str, api: _ApiPath | None, params: Mapping[str, str]) -> str:
    if api is None or api.plural is None:
        return method.lower()
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if api.name else "list"
    return {
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if api.name else "deletecollection",
    }.get(method, method.lower())


# Our verbs as kmock's actions, so kmock's DSL filters (`emulator[kmock.action.WATCH]`) work.
_KMOCK_ACTIONS = {
    "list": kmock.action.LIST, "watch": kmock.action.WATCH, "get": kmock.action.FETCH,
    "create": kmock.action.CREATE, "patch": kmock.action.UPDATE, "delete": kmock.action.DELETE,
}


@dataclasses.dataclass(frozen=True)
class _Event:
    rv: int
    key: tuple[str, str]
    namespace: str | None
    type: str
    obj: Mapping[str, Any]  # stored objects are never mutated after storing: no copies needed


@dataclasses.dataclass(eq=False)
class _Watcher:
    key: tuple[str, str]
    namespace: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: list[selectors.FieldRequirement]
    queue: asyncio.Queue[_Event | None]

    def matches(self, event: _Event) -> bool:
        return self.matches_object(event.key, event.namespace, event.obj)

    def matches_object(self, key: tuple[str, str], namespace: str | None,
                       obj: Mapping[str, Any]) -> bool:
        return (
            key == self.key
            and (self.namespace is None or namespace == self.namespace)
            and self.labels((obj.get("metadata") or {}).get("labels") or {})
            and selectors.fields_match(obj, self.fields)
        )


def _header(request: kmock.Request, name: str) -> str:
    raw = request._raw_request
    if raw is not None:
        return str(raw.headers.get(name, ""))
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


def _json_response(body: Any, status: int = 200,
                   content_type: str = "application/json") -> aiohttp.web.Response:
    return aiohttp.web.Response(body=json.dumps(body).encode(), status=status,
                                headers={"Content-Type": content_type})


def _spec_part(rtype: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a change of bumps metadata.generation."""
    skipped = {"metadata", "apiVersion", "kind"}
    if rtype.has_subresource("status"):
        skipped.add("status")
    return {k: v for k, v in obj.items() if k not in skipped}


@attrs.define(kw_only=True)
class KubeAPIEmulator(kmock.KubernetesScaffold):
    """The emulator as a kmock handler: kmock's request plumbing, our API semantics.

    Reactions added with kmock's DSL take precedence and do not touch the state, i.e. they act
    as if the request never reached the server: `emulator[kmock.method.PATCH] << 500`.
    """

    bookmark_interval: float = 5.0  # kopf reconnects after 70 s of silence; a bookmark resets it
    # Events kept for resumed watches; older ones get 410 Gone and kopf re-lists. Each event
    # holds a full object version (several KiB with kopf's annotations), hence a bound.
    history_limit: int = 10_000
    watch_timeout: float | None = None  # server-side cap of a watch without timeoutSeconds
    server_address: str = "127.0.0.1:0"

    _types: dict[tuple[str, str], ResourceType] = attrs.field(init=False, factory=dict)
    _store: dict[tuple[str, str, str | None, str], dict[str, Any]] = attrs.field(
        init=False, factory=dict)
    _rv: int = attrs.field(init=False, default=1)
    _history: collections.deque[_Event] = attrs.field(init=False, default=None)
    _compacted_rv: int = attrs.field(init=False, default=0)
    _watchers: set[_Watcher] = attrs.field(init=False, factory=set)
    _records: list[RequestRecord] = attrs.field(init=False, factory=list)
    _closing: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        # Deliberately not calling the base: its fallback reactions would route requests into
        # kmock's own (semantically poorer) emulation, and a reaction on every request makes
        # kmock's matching quadratic in the number of recorded requests.
        self._history = collections.deque(maxlen=self.history_limit)
        for rtype in resources.BUILTINS:
            self._types[rtype.key] = rtype
        for name in INITIAL_NAMESPACES:
            self._store[("", "namespaces", None, name)] = {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": str(uuid.uuid4()),
                             "creationTimestamp": _now(), "resourceVersion": "1"},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }

    # ------------------------------------------------------------------ inspection
    @property
    def records(self) -> list[RequestRecord]:
        """Every API request received so far, oldest first (a copy)."""
        return list(self._records)

    def clear_records(self) -> None:
        self._records.clear()

    @property
    def resource_version(self) -> int:
        return self._rv

    def get_object(self, group: str, plural: str, namespace: str | None,
                   name: str) -> dict[str, Any] | None:
        obj = self._store.get((group, plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def close_watches(self) -> None:
        """End every open watch stream (as a real server restart would)."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)

    # ------------------------------------------------------------------ dispatch
    @override
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, with our own URL parsing.

        kmock 0.8 parses `/api/v1/namespaces` as "namespace=<missing>" and fails with a 500
        before any handler runs; so the request is built here with correct Kubernetes fields
        (which also makes kmock's DSL filters such as `kmock.resource('v1/namespaces')` match).
        """
        await raw_request.read()
        try:
            request = await self._parse_request(raw_request)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as e:
                if e.__cause__ is not None:
                    raise e.__cause__ from None
                raise
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            return await self._render_error(e)

    async def _parse_request(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw_request.read()
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = None
        api = _parse_path(raw_request.path)
        query = dict(raw_request.query)
        action = _KMOCK_ACTIONS.get(_verb(raw_request.method, api, query)) \
            if api is not None and api.plural is not None else None
        return kmock.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url,
            method=raw_request.method, params=query, headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), data=data, body=body, text=text,
            action=action,
            resource=None if api is None else kmock.resource(
                group=api.group, version=api.version, plural=api.plural),
            namespace=api.namespace if api else None, name=api.name if api else None,
            subresource=api.subresource if api else None,
        )

    @override
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        api = _parse_path(path)
        record: RequestRecord | None = None
        if not path.startswith("/_emulator/"):
            auth = _header(request, "Authorization")
            record = RequestRecord(
                verb=_verb(str(request.method.value), api, request.params),
                group=api.group if api and api.plural else None,
                version=api.version if api and api.plural else None,
                resource=api.plural if api else None,
                subresource=api.subresource if api else None,
                namespace=api.namespace if api else None,
                name=api.name if api else None,
                path=path,
                params=dict(request.params),
                user=auth.removeprefix("Bearer ").strip() or "system:anonymous",
                user_agent=_header(request, "User-Agent"),
            )
            self._records.append(record)
        try:
            if self._payloads:  # reactions declared by a test win over the emulation
                with contextlib.suppress(NotImplementedError):
                    response = await super()._handle(request)
                    if record is not None:
                        record.status = response.status
                    return response
            response = await self._serve(request, api, record)
        except ApiError as e:
            response = _json_response(e.status(), e.code)
        except Exception:
            if record is not None:
                record.status = 500
            raise  # kmock renders it as a 500 and keeps it in `self.errors` for teardown checks
        if record is not None and not record.status:
            record.status = response.status
        return response

    async def _serve(self, request: kmock.Request, api: _ApiPath | None,
                     record: RequestRecord | None) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value)
        if path.startswith("/_emulator/"):
            return self._serve_debug(method, path)
        if method == "GET":
            if path in ("/healthz", "/livez", "/readyz"):
                return aiohttp.web.Response(text="ok")
            if path == "/version":
                return _json_response(SERVER_VERSION)
            if path == "/api":
                return _json_response({
                    "kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}],
                })
            if path == "/apis":
                return _json_response(self._api_group_list())
            if match := re.fullmatch(r"/apis/([^/]+)", path):
                return _json_response(self._api_group(match.group(1)))
            if path == "/":
                return _json_response({"paths": ["/api", "/api/v1", "/apis", "/openapi/v3",
                                                 "/version"]})
            if path == "/openapi/v3":
                return _json_response(self._openapi_root())
            if path.startswith("/openapi/v3/"):
                return _json_response(self._openapi_group_version(
                    path.removeprefix("/openapi/v3/")))
        if api is None:
            raise _NO_RESOURCE
        if api.plural is None:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            return _json_response(self._api_resource_list(api.group, api.version))

        rtype = self._types.get((api.group, api.plural))
        if rtype is None or api.version not in rtype.versions:
            raise _NO_RESOURCE
        if api.subresource is not None and not rtype.has_subresource(api.subresource,
                                                                     api.version):
            raise _NO_RESOURCE
        if api.namespace is not None and not rtype.namespaced:
            raise _NO_RESOURCE

        params = request.params
        verb = _verb(method, api, params)
        accept = _header(request, "Accept")
        body = request.data
        if request.body and "protobuf" in _header(request, "Content-Type"):
            # kubectl create's typed clients send protobuf for built-in kinds (see protobuf.py).
            try:
                if verb not in ("create", "update"):
                    raise protobuf.ProtobufError("protobuf is only read for create and update")
                body = protobuf.decode(request.body)
            except protobuf.ProtobufError as e:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in "
                               f"an unknown format - accepted media types include: "
                               f"application/json ({e})") from e
        if verb == "watch":
            return await self._serve_watch(request, rtype, api, record)
        if verb == "list":
            return self._serve_list(rtype, api, params, accept)
        if verb == "get":
            return self._serve_get(rtype, api, params, accept)
        dry_run = params.get("dryRun") == "All"
        if verb == "create":
            if api.name is not None or api.subresource is not None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            return _json_response(self._create(rtype, api, body, dry_run=dry_run), 201)
        if verb == "update":
            return _json_response(self._update(rtype, api, body, dry_run=dry_run))
        if verb == "patch":
            content_type = _header(request, "Content-Type").split(";")[0].strip()
            return _json_response(self._patch(rtype, api, body, content_type, dry_run=dry_run))
        if verb == "delete":
            return _json_response(self._delete(rtype, api, body, dry_run=dry_run))
        if verb == "deletecollection":
            return _json_response(self._delete_collection(rtype, api, params, dry_run=dry_run))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")

    def _serve_debug(self, method: str, path: str) -> aiohttp.web.StreamResponse:
        if path == "/_emulator/requests" and method == "GET":
            return _json_response({"items": [dataclasses.asdict(r) for r in self._records]})
        if path == "/_emulator/requests" and method == "DELETE":
            self.clear_records()
            return _json_response({"items": []})
        raise _NO_RESOURCE

    # ------------------------------------------------------------------ discovery
    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rtype in self._types.values():
            versions = groups.setdefault(rtype.group, [])
            for version in rtype.versions:
                if version not in versions:
                    versions.append(version)
        return groups

    def _api_group(self, group: str) -> dict[str, Any]:
        versions = self._group_versions().get(group)
        if not group or not versions:
            raise _NO_RESOURCE
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
                "preferredVersion": entries[0]}

    def _api_group_list(self) -> dict[str, Any]:
        groups = [self._api_group(group) for group in self._group_versions() if group]
        for group in groups:
            del group["kind"], group["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        served = [t for t in self._types.values() if t.group == group and version in t.versions]
        if not served:
            raise _NO_RESOURCE
        entries: list[dict[str, Any]] = []
        for rtype in served:
            entry: dict[str, Any] = {
                "name": rtype.plural, "singularName": rtype.singular,
                "namespaced": rtype.namespaced, "kind": rtype.kind, "verbs": list(rtype.verbs),
            }
            if rtype.short_names:
                entry["shortNames"] = list(rtype.short_names)
            if rtype.categories:
                entry["categories"] = list(rtype.categories)
            entries.append(entry)
            for sub in sorted(rtype.subresources.get(version, frozenset())):
                entries.append({"name": f"{rtype.plural}/{sub}", "singularName": "",
                                "namespaced": rtype.namespaced, "kind": rtype.kind,
                                "verbs": list(resources.SUBRESOURCE_VERBS)})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": entries}

    # ------------------------------------------------------------------ OpenAPI
    # kubectl (apply/create/replace, default --validate=strict) reads /openapi/v3 to decide
    # whether the server validates fields itself. A PATCH operation that declares the
    # `fieldValidation` query parameter for a kind means "yes", so kubectl sends
    # fieldValidation=Strict instead of downloading schemas. The emulator ignores it (no schema
    # validation here: CRDs and samples are validated offline). CRD schemas are served as a
    # real server publishes them, so `kubectl explain pgr.spec` shows the CRD's descriptions;
    # built-in types get none, and strategic-merge patches fall back to kubectl's built-in type
    # information, as with a server without OpenAPI.
    def _openapi_group_version(self, relative: str) -> dict[str, Any]:
        parts = relative.strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) == 2:
            group, version = "", parts[1]
        elif parts[:1] == ["apis"] and len(parts) == 3:
            group, version = parts[1], parts[2]
        else:
            raise _NO_RESOURCE
        served = [t for t in self._types.values() if t.group == group and version in t.versions]
        if not served:
            raise _NO_RESOURCE
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        content = {"application/json-patch+json": {"schema": {"type": "object"}},
                   "application/merge-patch+json": {"schema": {"type": "object"}}}
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for rtype in served:
            if rtype.custom and rtype.schemas.get(version):
                schemas[self._schema_name(rtype, version)] = self._crd_schema(rtype, version)
            scope = "/namespaces/{namespace}" if rtype.namespaced else ""
            paths[f"{prefix}{scope}/{rtype.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": version,
                                                    "kind": rtype.kind},
                "x-kubernetes-action": "patch",
                "parameters": [
                    {"name": name, "in": "query", "schema": {"type": "string"}}
                    for name in ("dryRun", "fieldManager", "fieldValidation", "force")
                ],
                "requestBody": {"content": content},
                "responses": {"200": {"description": "OK"}},
            }}
        return {"openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
                "paths": paths, "components": {"schemas": schemas}}

    @staticmethod
    def _schema_name(rtype: ResourceType, version: str) -> str:
        reversed_group = ".".join(reversed(rtype.group.split(".")))
        return f"{reversed_group}.{version}.{rtype.kind}"

    @staticmethod
    def _crd_schema(rtype: ResourceType, version: str) -> dict[str, Any]:
        """The CRD's schema plus what a real server adds: apiVersion, kind, metadata, GVK."""
        schema = copy.deepcopy(dict(rtype.schemas[version]))
        properties = schema.setdefault("properties", {})
        properties.setdefault("apiVersion", {
            "type": "string", "description": "APIVersion defines the versioned schema of this "
            "representation of an object."})
        properties.setdefault("kind", {
            "type": "string", "description": "Kind is a string value representing the REST "
            "resource this object represents."})
        properties["metadata"] = {"type": "object", "description": "Standard object's "
                                  "metadata."}
        schema["x-kubernetes-group-version-kind"] = [
            {"group": rtype.group, "kind": rtype.kind, "version": version}]
        return schema

    def _openapi_root(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for group, versions in self._group_versions().items():
            for version in versions:
                relative = f"apis/{group}/{version}" if group else f"api/{version}"
                digest = hashlib.sha256(json.dumps(self._openapi_group_version(relative),
                                                   sort_keys=True).encode()).hexdigest()
                paths[relative] = {"serverRelativeURL": f"/openapi/v3/{relative}?hash="
                                                        f"{digest[:32].upper()}"}
        return {"paths": paths}

    # ------------------------------------------------------------------ reading
    def _render(self, rtype: ResourceType, version: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        rendered = dict(obj)
        rendered["apiVersion"] = rtype.api_version(version)
        rendered["kind"] = rtype.kind
        return rendered

    def _objects(self, rtype: ResourceType, namespace: str | None) -> list[dict[str, Any]]:
        found = [
            obj for (group, plural, ns, _), obj in self._store.items()
            if (group, plural) == rtype.key and (namespace is None or ns == namespace)
        ]
        found.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return found

    def _selectors(self, rtype: ResourceType, params: Mapping[str, str],
                   name: str | None = None) -> tuple[Callable[[Mapping[str, str]], bool],
                                                     list[selectors.FieldRequirement]]:
        try:
            labels = selectors.parse_label_selector(params.get("labelSelector"))
            fields = selectors.parse_field_selector(params.get("fieldSelector"))
        except selectors.SelectorError as e:
            raise _bad_request(str(e)) from e
        for req in fields:
            if not rtype.field_selector_allowed(req.field):
                raise _bad_request(f'field label not supported: {req.field}')
        if name is not None:
            fields.append(selectors.FieldRequirement("metadata.name", False, name))
        return labels, fields

    def _get_stored(self, rtype: ResourceType, api: _ApiPath) -> dict[str, Any]:
        if api.name is None:
            raise _NO_RESOURCE
        namespace = api.namespace if rtype.namespaced else None
        if rtype.namespaced and namespace is None:
            raise _NO_RESOURCE
        obj = self._store.get((rtype.group, rtype.plural, namespace, api.name))
        if obj is None:
            raise _not_found(rtype, api.name)
        return obj

    def _serve_get(self, rtype: ResourceType, api: _ApiPath, params: Mapping[str, str],
                   accept: str) -> aiohttp.web.StreamResponse:
        obj = self._render(rtype, api.version, self._get_stored(rtype, api))
        if tables.wants_table(accept):
            return _json_response(
                tables.table(rtype, api.version, [obj], resource_version=str(self._rv),
                             include_object=params.get("includeObject", "Metadata")),
                content_type=tables.TABLE_MEDIA)
        return _json_response(obj)

    def _serve_list(self, rtype: ResourceType, api: _ApiPath, params: Mapping[str, str],
                    accept: str) -> aiohttp.web.StreamResponse:
        labels, fields = self._selectors(rtype, params)
        items = [
            obj for obj in self._objects(rtype, api.namespace)
            if labels(obj["metadata"].get("labels") or {})
            and selectors.fields_match(obj, fields)
        ]
        list_rv = str(self._rv)
        # Pagination (kubectl get asks for limit=500): the continue token is the last key seen.
        start = 0
        if token := params.get("continue"):
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                last = tuple(state["last"])
                list_rv = str(state["rv"])
            except (ValueError, KeyError, TypeError) as e:
                raise _bad_request("continue key is not valid") from e
            start = next((i for i, o in enumerate(items)
                          if (o["metadata"].get("namespace") or "", o["metadata"]["name"]) > last),
                         len(items))
        items = items[start:]
        continue_token = ""
        remaining = 0
        if (limit := int(params.get("limit") or 0)) and len(items) > limit:
            remaining = len(items) - limit
            items = items[:limit]
            last_meta = items[-1]["metadata"]
            continue_token = base64.urlsafe_b64encode(json.dumps({
                "last": [last_meta.get("namespace") or "", last_meta["name"]], "rv": list_rv,
            }).encode()).decode()
        rendered = [self._render(rtype, api.version, obj) for obj in items]
        if tables.wants_table(accept):
            return _json_response(
                tables.table(rtype, api.version, rendered, resource_version=list_rv,
                             include_object=params.get("includeObject", "Metadata"),
                             continue_token=continue_token),
                content_type=tables.TABLE_MEDIA)
        metadata: dict[str, Any] = {"resourceVersion": list_rv}
        if continue_token:
            metadata.update({"continue": continue_token, "remainingItemCount": remaining})
        return _json_response({
            "apiVersion": rtype.api_version(api.version), "kind": rtype.list_kind,
            "metadata": metadata, "items": rendered,
        })

    async def _serve_watch(self, request: kmock.Request, rtype: ResourceType,
                           api: _ApiPath, record: RequestRecord | None,
                           ) -> aiohttp.web.StreamResponse:
        params = request.params
        labels, fields = self._selectors(rtype, params, name=api.name)
        since = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true"
        if since not in ("", "0") and not since.isdigit():
            raise _bad_request(f"invalid resource version: {since!r}")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else \
            self.watch_timeout
        bookmarks = params.get("allowWatchBookmarks") == "true"
        as_table = tables.wants_table(_header(request, "Accept"))
        include = params.get("includeObject", "Metadata")

        watcher = _Watcher(rtype.key, api.namespace, labels, fields, asyncio.Queue())

        def render(event_type: str, obj: Mapping[str, Any]) -> bytes:
            shown: Mapping[str, Any] = self._render(rtype, api.version, obj)
            if as_table:
                shown = tables.table(rtype, api.version, [shown], include_object=include,
                                     resource_version=str(obj["metadata"]["resourceVersion"]))
            return json.dumps({"type": event_type, "object": shown}).encode() + b"\n"

        # Registering and taking the backlog happen without an await in between, so no event
        # can fall into the gap between "history so far" and "live from now on".
        backlog: list[bytes] = []
        expired = False
        if since in ("", "0") or initial:
            for obj in self._objects(rtype, api.namespace):
                if watcher.matches_object(rtype.key, api.namespace, obj):
                    backlog.append(render("ADDED", obj))
            if initial:
                backlog.append(self._bookmark(rtype, api.version, initial_end=True))
        elif int(since) < self._compacted_rv:
            expired = True
            backlog.append(json.dumps({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since} ({self._compacted_rv})",
                "reason": "Expired", "code": 410}}).encode() + b"\n")
        else:
            backlog.extend(render(e.type, e.obj) for e in self._history
                           if e.rv > int(since) and watcher.matches(e))
        if not expired:
            self._watchers.add(watcher)

        assert request._raw_request is not None  # only None in kmock's own artificial setups
        response = aiohttp.web.StreamResponse(status=200,
                                              headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            await response.prepare(request._raw_request)
            if record is not None:
                record.status = 200
            for line in backlog:
                await response.write(line)
            last_write = time.monotonic()
            while not expired and not self._closing:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= last_write + self.bookmark_interval \
                        and watcher.queue.empty():
                    # Only when idle: everything up to the current version is already sent.
                    await response.write(self._bookmark(rtype, api.version))
                    last_write = now
                    continue
                waits = [deadline - now] if deadline is not None else []
                if bookmarks:
                    waits.append(last_write + self.bookmark_interval - now)
                try:
                    event = await asyncio.wait_for(watcher.queue.get(),
                                                   min(waits) if waits else None)
                except TimeoutError:
                    continue
                if event is None:
                    break
                await response.write(render(event.type, event.obj))
                last_write = time.monotonic()
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away (kopf stopping, kubectl wait done): not an error
        finally:
            # Also on cancellation: aiohttp cancels the handler when the client disconnects.
            self._watchers.discard(watcher)
        return response

    def _bookmark(self, rtype: ResourceType, version: str, *, initial_end: bool = False) -> bytes:
        metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return json.dumps({"type": "BOOKMARK", "object": {
            "kind": rtype.kind, "apiVersion": rtype.api_version(version),
            "metadata": metadata}}).encode() + b"\n"

    # ------------------------------------------------------------------ writing
    def _commit(self, rtype: ResourceType, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        """Store a new version under a fresh resourceVersion and tell the watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        key = (rtype.group, rtype.plural, meta.get("namespace"), meta["name"])
        if event_type == "DELETED":
            self._store.pop(key, None)
        else:
            self._store[key] = obj
        if len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        event = _Event(self._rv, rtype.key, meta.get("namespace"), event_type, obj)
        self._history.append(event)
        for watcher in list(self._watchers):
            if watcher.matches(event):
                watcher.queue.put_nowait(event)
        if event_type == "DELETED":
            self._after_removal(rtype, obj)
        return obj

    def _after_removal(self, rtype: ResourceType, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        if rtype.key == resources.CRD_KEY:
            removed = self._types.get(((obj.get("spec") or {}).get("group", ""),
                                       (obj.get("spec") or {}).get("names", {}).get("plural", "")))
            if removed is not None and removed.custom:
                del self._types[removed.key]
                for child in self._objects(removed, None):
                    self._commit(removed, copy.deepcopy(child), "DELETED")
        namespace = meta.get("namespace")
        if namespace is not None:
            self._finish_namespace_termination(namespace)

    def _finish_namespace_termination(self, namespace: str) -> None:
        ns_obj = self._store.get(("", "namespaces", None, namespace))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if any(ns == namespace for (_, _, ns, _) in self._store):
            return
        self._commit(self._types[resources.NAMESPACES_KEY], copy.deepcopy(ns_obj), "DELETED")

    def _prepare_special(self, rtype: ResourceType, obj: dict[str, Any],
                         current: Mapping[str, Any] | None = None) -> None:
        """Type-specific server behaviour on every write."""
        if rtype.key == ("", "secrets"):
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = obj.setdefault("data", {})
                for key, value in string_data.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
            obj.setdefault("type", "Opaque")
        elif rtype.key == resources.CRD_KEY:
            try:
                served = resources.from_crd(obj)
            except resources.InvalidDefinitionError as e:
                raise _invalid(rtype, obj["metadata"].get("name", ""), str(e)) from e
            existing = self._types.get(served.key)
            if existing is not None and not existing.custom:
                raise _invalid(rtype, obj["metadata"]["name"], "the group/plural is built in")
            names = copy.deepcopy(obj["spec"]["names"])
            names.setdefault("singular", served.singular)
            names.setdefault("listKind", served.list_kind)
            now = _now()
            previous = (current or {}).get("status") or {}
            stored_versions = list(previous.get("storedVersions") or [])
            if resources.storage_version(obj) not in stored_versions:
                stored_versions.append(resources.storage_version(obj))
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": stored_versions,
                "conditions": previous.get("conditions") or [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted",
                     "lastTransitionTime": now},
                ],
            }

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        served = resources.from_crd(crd)
        self._types[served.key] = served

    def _create(self, rtype: ResourceType, api: _ApiPath, body: Any, *,
                dry_run: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        if obj.get("kind") not in (None, rtype.kind):
            raise _bad_request(f"the kind in the data ({obj.get('kind')}) does not match the "
                               f"expected kind ({rtype.kind})")
        if obj.get("apiVersion") not in (None, rtype.api_version(api.version)):
            raise _bad_request(f"the API version in the data ({obj.get('apiVersion')}) does not "
                               f"match the expected API version "
                               f"({rtype.api_version(api.version)})")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if rtype.namespaced:
            if api.namespace is None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            if meta.get("namespace") not in (None, "", api.namespace):
                raise _bad_request("the namespace of the provided object does not match the "
                                   "namespace sent on the request")
            meta["namespace"] = api.namespace
            ns_obj = self._store.get(("", "namespaces", None, api.namespace))
            if ns_obj is None:
                raise _not_found(self._types[resources.NAMESPACES_KEY], api.namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(403, "Forbidden", f"{rtype.qualified_name} is forbidden: unable "
                               f"to create new content in namespace {api.namespace} because it "
                               f"is being terminated")
        else:
            meta.pop("namespace", None)

        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise _invalid(rtype, "", "metadata.name: Required value: name or generateName "
                               "is required")
            for _ in range(100):
                suffix = "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)]
                                 for b in uuid.uuid4().bytes[:5])
                candidate = f"{prefix}{suffix}"
                if (rtype.group, rtype.plural, meta.get("namespace"), candidate) not in \
                        self._store:
                    meta["name"] = candidate
                    break
        name = meta["name"]
        is_label = rtype.key == resources.NAMESPACES_KEY  # namespace names are DNS labels
        if len(name) > (63 if is_label else 253) or not (_DNS_LABEL if is_label
                                                          else _DNS_SUBDOMAIN).match(name):
            raise _invalid(rtype, name, f'metadata.name: Invalid value: "{name}": a lowercase '
                           "RFC 1123 subdomain must consist of lower case alphanumeric "
                           "characters, '-' or '.', and must start and end with an "
                           "alphanumeric character")
        if (rtype.group, rtype.plural, meta.get("namespace"), name) in self._store:
            raise ApiError(409, "AlreadyExists", f'{rtype.qualified_name} "{name}" already exists',
                           {"name": name, "group": rtype.group, "kind": rtype.plural})

        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                      "managedFields", "selfLink"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rtype.tracks_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if rtype.has_subresource("status", api.version):
            obj.pop("status", None)  # a real server drops it: status is written via /status
        if rtype.key == resources.NAMESPACES_KEY:
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["apiVersion"] = rtype.api_version(rtype.versions[0])
        obj["kind"] = rtype.kind
        self._prepare_special(rtype, obj)
        if dry_run:
            return self._render(rtype, api.version, obj)
        stored = self._commit(rtype, obj, "ADDED")
        if rtype.key == resources.CRD_KEY:
            self._register_crd(stored)
        return self._render(rtype, api.version, stored)

    def _check_rv_precondition(self, rtype: ResourceType, current: Mapping[str, Any],
                               candidate_rv: Any) -> None:
        if candidate_rv not in (None, "") and str(candidate_rv) != \
                current["metadata"]["resourceVersion"]:
            raise _conflict(rtype, current["metadata"]["name"])

    def _update(self, rtype: ResourceType, api: _ApiPath, body: Any, *,
                dry_run: bool) -> dict[str, Any]:
        current = self._get_stored(rtype, api)
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, api.name):
            raise _bad_request(f"the name of the object ({meta.get('name')}) does not match "
                               f"the name on the URL ({api.name})")
        if rtype.custom and not meta.get("resourceVersion"):
            raise _invalid(rtype, str(api.name), "metadata.resourceVersion: Invalid value: "
                           "0x0: must be specified for an update")
        self._check_rv_precondition(rtype, current, meta.get("resourceVersion"))
        return self._write(rtype, api, current, copy.deepcopy(body), dry_run=dry_run)

    def _patch(self, rtype: ResourceType, api: _ApiPath, body: Any, content_type: str, *,
               dry_run: bool) -> dict[str, Any]:
        accepted = [patches.JSON, patches.MERGE] + ([] if rtype.custom else [patches.STRATEGIC])
        if content_type not in accepted:
            # Checked first, as a real server does: `kubectl apply --server-side` must learn
            # that it is unsupported here, not that the object does not exist yet.
            unsupported = "server-side apply is not emulated; " if content_type == \
                patches.APPLY else ""
            raise ApiError(415, "UnsupportedMediaType",
                           f"{unsupported}the body of the request was in an unknown format - "
                           f"accepted media types include: {', '.join(accepted)}")
        current = self._get_stored(rtype, api)
        name = str(api.name)
        try:
            if content_type == patches.MERGE:
                if not isinstance(body, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                rv = (body.get("metadata") or {}).get("resourceVersion")
                self._check_rv_precondition(rtype, current, rv)
                candidate = patches.merge_patch(current, body)
            elif content_type == patches.JSON:
                candidate = patches.json_patch(current, body)
            else:
                if not isinstance(body, dict):
                    raise _bad_request("a strategic merge patch must be a JSON object")
                rv = (body.get("metadata") or {}).get("resourceVersion")
                self._check_rv_precondition(rtype, current, rv)
                candidate = patches.strategic_merge_patch(current, body)
        except patches.PatchError as e:
            raise ApiError(422, "Invalid", str(e), {"name": name, "group": rtype.group,
                                                    "kind": rtype.plural}) from e
        if not isinstance(candidate, dict):
            raise _invalid(rtype, name, "the patched object is not an object")
        return self._write(rtype, api, current, candidate, dry_run=dry_run)

    def _write(self, rtype: ResourceType, api: _ApiPath, current: dict[str, Any],
               candidate: dict[str, Any], *, dry_run: bool) -> dict[str, Any]:
        """Turn a client's desired object into the next stored version (or no change)."""
        status_sub = rtype.has_subresource("status", api.version)
        if api.subresource == "status":
            new = copy.deepcopy(current)
            if candidate.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(candidate["status"])
        else:
            new = candidate
            if status_sub:
                if current.get("status") is None:
                    new.pop("status", None)
                else:
                    new["status"] = copy.deepcopy(current["status"])
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        for field in _SYSTEM_METADATA:
            if field in current["metadata"]:
                meta[field] = current["metadata"][field]
            else:
                meta.pop(field, None)
        meta.pop("managedFields", None)
        if meta.get("finalizers") == []:
            del meta["finalizers"]  # a real server stores no empty list
        new["apiVersion"] = current["apiVersion"]
        new["kind"] = current["kind"]

        if current["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(current["metadata"].get("finalizers")
                                                             or [])
            if added:
                raise _invalid(rtype, meta["name"], "metadata.finalizers: Forbidden: no new "
                               f"finalizers can be added if the object is being deleted, found "
                               f"new finalizers {sorted(added)!r}")
        self._prepare_special(rtype, new, current)
        if rtype.tracks_generation and _spec_part(rtype, new) != _spec_part(rtype, current):
            meta["generation"] = int(current["metadata"].get("generation", 0)) + 1

        if new == current:
            return self._render(rtype, api.version, current)  # no-op: no new version, no event
        if dry_run:
            return self._render(rtype, api.version, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._render(rtype, api.version, self._commit(rtype, new, "DELETED"))
        stored = self._commit(rtype, new, "MODIFIED")
        if rtype.key == resources.CRD_KEY:
            self._register_crd(stored)
        return self._render(rtype, api.version, stored)

    def _delete(self, rtype: ResourceType, api: _ApiPath, body: Any, *,
                dry_run: bool) -> dict[str, Any]:
        current = self._get_stored(rtype, api)
        preconditions = (body or {}).get("preconditions") or {} if isinstance(body, dict) else {}
        if preconditions.get("uid") not in (None, current["metadata"]["uid"]):
            raise _conflict(rtype, current["metadata"]["name"])
        self._check_rv_precondition(rtype, current, preconditions.get("resourceVersion"))
        if dry_run:
            return self._render(rtype, api.version, current)
        return self._render(rtype, api.version, self._delete_object(rtype, current))

    def _delete_object(self, rtype: ResourceType, current: dict[str, Any]) -> dict[str, Any]:
        if current["metadata"].get("deletionTimestamp"):
            return current  # already terminating: deleting again changes nothing
        is_namespace = rtype.key == resources.NAMESPACES_KEY
        if not current["metadata"].get("finalizers") and not is_namespace:
            return self._commit(rtype, copy.deepcopy(current), "DELETED")
        new = copy.deepcopy(current)
        new["metadata"]["deletionTimestamp"] = _now()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        if rtype.tracks_generation:
            new["metadata"]["generation"] = int(new["metadata"].get("generation", 0)) + 1
        if is_namespace:
            new["status"] = {"phase": "Terminating"}
        stored = self._commit(rtype, new, "MODIFIED")
        if is_namespace:
            namespace = stored["metadata"]["name"]
            for (group, plural, ns, _), obj in list(self._store.items()):
                if ns == namespace:
                    self._delete_object(self._types[(group, plural)], obj)
            self._finish_namespace_termination(namespace)
        return stored

    def _delete_collection(self, rtype: ResourceType, api: _ApiPath, params: Mapping[str, str],
                           *, dry_run: bool) -> dict[str, Any]:
        labels, fields = self._selectors(rtype, params)
        victims = [
            obj for obj in self._objects(rtype, api.namespace)
            if labels(obj["metadata"].get("labels") or {}) and selectors.fields_match(obj, fields)
        ]
        if not dry_run:
            victims = [self._delete_object(rtype, obj) for obj in victims]
        return {"apiVersion": rtype.api_version(api.version), "kind": rtype.list_kind,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": [self._render(rtype, api.version, obj) for obj in victims]}


# ---------------------------------------------------------------------- running it


@contextlib.asynccontextmanager
async def serve(host: str = "127.0.0.1", port: int = 0,
                **options: Any) -> AsyncIterator[tuple[KubeAPIEmulator, str]]:
    """Run the emulator in the current event loop; yields the handler and its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_host, bound_port = sock.getsockname()[:2]
    emulator = KubeAPIEmulator(server_address=f"{bound_host}:{bound_port}", **options)
    async with emulator:
        # handler_cancellation: a watch whose client disconnected ends at once, not on its
        # next write, so no watcher outlives its client.
        server = aiohttp.web.Server(emulator, handler_cancellation=True)
        # Short shutdown: open watch streams are ended by close_watches() first.
        runner = aiohttp.web.ServerRunner(server, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = aiohttp.web.SockSite(runner, sock)
        await site.start()
        try:
            yield emulator, f"http://{bound_host}:{bound_port}"
        finally:
            emulator.close_watches()
            await asyncio.sleep(0)
            await runner.cleanup()


class EmulatorThread:
    """The emulator in a background thread with its own event loop (for any kind of test).

    Use as a context manager or with start()/stop(). `call()` runs a function in the
    emulator's loop, which is the safe way to touch its state from another thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self._host = host
        self._port = port
        self._options = options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.emulator: KubeAPIEmulator | None = None
        self.url = ""

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kubeapi-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._failure is not None:
            raise RuntimeError("the Kubernetes API emulator failed to start") from self._failure
        if not self._ready.is_set():
            raise RuntimeError("the Kubernetes API emulator did not start within 30 s")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # reported to start() or kept for stop()
            self._failure = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._host, self._port, **self._options) as (emulator, url):
            self.emulator, self.url = emulator, url
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may already be gone
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._thread = None

    def call(self, fn: Callable[[], _T], timeout: float = 10) -> _T:
        """Run `fn()` inside the emulator's event loop and return its result."""
        if self._loop is None:
            raise RuntimeError("the emulator is not running")

        async def invoke() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout)


def kubeconfig(url: str, *, user: str = "admin", namespace: str = "default") -> dict[str, Any]:
    """A kubeconfig for the emulator; the token is the user name the request log shows.

    kopf sends the token over plain HTTP; kubectl does not (its requests are anonymous).
    """
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": user, "user": {"token": user}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": user, "namespace": namespace}}],
        "current-context": "emulator",
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str, *, user: str = "admin",
                     namespace: str = "default") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig(url, user=user, namespace=namespace)),
                    encoding="utf-8")
    path.chmod(0o600)
    return path


def fetch_records(url: str, *, clear: bool = False) -> list[RequestRecord]:
    """The request log of an emulator at `url` (any mode, e.g. `python -m tests.kubeapi`)."""
    request = urllib.request.Request(f"{url}/_emulator/requests",  # noqa: S310  (our own URL)
                                     method="DELETE" if clear else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        items = json.loads(response.read())["items"]
    return [RequestRecord(**item) for item in items]


def main(argv: Iterable[str] | None = None) -> None:
    """`python -m tests.kubeapi --port N [--kubeconfig PATH]`: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig", type=Path, help="also write a kubeconfig here")
    parser.add_argument("--user", default="admin", help="user (token) in that kubeconfig")
    parser.add_argument("--bookmark-interval", type=float, default=5.0)
    parser.add_argument("--watch-timeout", type=float, default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with serve(args.host, args.port, bookmark_interval=args.bookmark_interval,
                         watch_timeout=args.watch_timeout) as (_, url):
            if args.kubeconfig is not None:
                write_kubeconfig(args.kubeconfig, url, user=args.user)
            sys.stdout.write(f"KUBEAPI_URL={url}\n")
            sys.stdout.flush()
            await stop.wait()

    asyncio.run(run())


__all__ = [
    "ApiError",
    "EmulatorThread",
    "KubeAPIEmulator",
    "RequestRecord",
    "fetch_records",
    "kubeconfig",
    "main",
    "serve",
    "write_kubeconfig",
]
