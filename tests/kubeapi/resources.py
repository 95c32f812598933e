"""What the emulated API server serves: built-in resource types and CRD-defined ones.

A real kube-apiserver knows its built-in types from compiled Go code and learns custom ones from
CustomResourceDefinitions. The emulator does the same with plain data: `BUILTINS` lists the
built-in types our operator, its manifests and `kubectl` touch, and `from_crd()` turns a posted
`apiextensions.k8s.io/v1` CRD into a served type. Discovery documents, tables, status-subresource
rules and generation tracking are all derived from `ResourceType`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")

# Field selectors a real server accepts beyond metadata.name/metadata.namespace, per type.
# Custom resources accept only those two (plus CRD `selectableFields`): the emulator rejects the
# rest with 400 as a real server does, so a selector that would fail in a cluster fails here too.
_EVENT_FIELDS = frozenset({
    "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
    "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
    "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
})


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served resource type (all its served versions share one storage)."""

    group: str  # "" for the core group
    versions: tuple[str, ...]  # served versions, the first one preferred
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # Per served version: subresource names ("status", "scale") and printer columns.
    subresources: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    printer_columns: Mapping[str, tuple[Mapping[str, Any], ...]] = dataclasses.field(
        default_factory=dict)
    selectable_fields: frozenset[str] = frozenset()
    # Per served version: the CRD's openAPIV3Schema (served for `kubectl explain`).
    schemas: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # metadata.generation is maintained only where a real server maintains it (not for
    # Secrets, ConfigMaps, Events, Namespaces).
    tracks_generation: bool = False
    # Custom resources behave differently in a few places: PUT needs a resourceVersion,
    # strategic merge patch is refused, only metadata.* field selectors are accepted.
    custom: bool = False
    verbs: tuple[str, ...] = ALL_VERBS

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified_name(self) -> str:
        """How a real server names the type in error messages: `toys.toy.pgrecovery.dev`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def has_subresource(self, name: str, version: str | None = None) -> bool:
        versions = [version] if version is not None else list(self.versions)
        return any(name in self.subresources.get(v, frozenset()) for v in versions)

    def columns(self, version: str) -> tuple[Mapping[str, Any], ...]:
        return tuple(self.printer_columns.get(version, ()))

    def field_selector_allowed(self, field: str) -> bool:
        if field in ("metadata.name", "metadata.namespace"):
            return True
        if self.custom:
            return field in self.selectable_fields
        if self.key == ("", "events"):
            return field in _EVENT_FIELDS
        if self.key == ("", "secrets"):
            return field == "type"
        if self.key == ("", "namespaces"):
            return field == "status.phase"
        if self.key == ("", "pods"):
            return field in ("spec.nodeName", "status.phase", "spec.serviceAccountName")
        return False


def _builtin(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    status: bool = False,
    generation: bool = False,
    categories: tuple[str, ...] = (),
    verbs: tuple[str, ...] = ALL_VERBS,
) -> ResourceType:
    return ResourceType(
        group=group,
        versions=(version,),
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        short_names=short,
        categories=categories,
        subresources={version: frozenset({"status"}) if status else frozenset()},
        tracks_generation=generation,
        verbs=verbs,
    )


CRD_GROUP = "apiextensions.k8s.io"
CRD_KEY = (CRD_GROUP, "customresourcedefinitions")
NAMESPACES_KEY = ("", "namespaces")

# The built-in types the operator, its manifests (RBAC, Deployment, Service) and kubectl touch.
# Anything else is a 404, as an unknown type would be on a real server; types that come from
# other operators' CRDs in a real cluster (ServiceMonitor, PrometheusRule) must be installed by
# posting their CRD, exactly as in a cluster.
BUILTINS: tuple[ResourceType, ...] = (
    _builtin("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",), status=True),
    _builtin("", "v1", "events", "Event", short=("ev",)),
    _builtin("", "v1", "secrets", "Secret"),
    _builtin("", "v1", "configmaps", "ConfigMap", short=("cm",)),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
    _builtin("", "v1", "services", "Service", short=("svc",), status=True, categories=("all",)),
    _builtin("", "v1", "pods", "Pod", short=("po",), status=True, categories=("all",)),
    _builtin("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",),
             status=True),
    _builtin("apps", "v1", "deployments", "Deployment", short=("deploy",), status=True,
             generation=True, categories=("all",)),
    _builtin("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    _builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
             namespaced=False),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease"),
    _builtin(CRD_GROUP, "v1", "customresourcedefinitions", "CustomResourceDefinition",
             namespaced=False, short=("crd", "crds"), status=True, generation=True,
             categories=("api-extensions",)),
)


class InvalidDefinitionError(ValueError):
    """The posted CRD cannot be served; the message is what a real server would say."""


def from_crd(crd: Mapping[str, Any]) -> ResourceType:
    """Build the served type from a CRD body, refusing what a real server refuses."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group") or ""
    plural = names.get("plural") or ""
    kind = names.get("kind") or ""
    name = (crd.get("metadata") or {}).get("name")
    if not group or not plural or not kind:
        raise InvalidDefinitionError(
            "spec.group, spec.names.plural and spec.names.kind are required")
    if name != f"{plural}.{group}":
        raise InvalidDefinitionError(
            f"metadata.name: Invalid value: {name!r}: must be spec.names.plural+\".\"+spec.group")
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        raise InvalidDefinitionError("spec.scope: Unsupported value: must be Namespaced or Cluster")
    versions = [v for v in spec.get("versions") or [] if v.get("served", True)]
    storage = [v for v in spec.get("versions") or [] if v.get("storage")]
    if len(storage) != 1:
        raise InvalidDefinitionError("spec.versions: Invalid value: must have exactly one version "
                                     "marked as storage version")
    # Preferred version first: a real server sorts by Kubernetes version priority; the storage
    # version is the usual preferred one and good enough here.
    versions.sort(key=lambda v: (not v.get("storage"), v.get("name", "")))
    selectable = frozenset(
        field.get("jsonPath", "").lstrip(".")
        for v in versions for field in v.get("selectableFields") or []
    )
    return ResourceType(
        group=group,
        versions=tuple(v["name"] for v in versions),
        plural=plural,
        singular=names.get("singular") or kind.lower(),
        kind=kind,
        namespaced=scope == "Namespaced",
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        subresources={
            v["name"]: frozenset((v.get("subresources") or {}).keys()) for v in versions
        },
        printer_columns={
            v["name"]: tuple(v.get("additionalPrinterColumns") or ()) for v in versions
        },
        selectable_fields=selectable,
        schemas={
            v["name"]: (v.get("schema") or {}).get("openAPIV3Schema") or {} for v in versions
        },
        tracks_generation=True,
        custom=True,
    )


def storage_version(crd: Mapping[str, Any]) -> str:
    for version in (crd.get("spec") or {}).get("versions") or []:
        if version.get("storage"):
            return str(version["name"])
    return ""
