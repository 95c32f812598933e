"""`meta.k8s.io/v1` Table responses: what `kubectl get` prints.

kubectl asks with `Accept: application/json;as=Table;v=v1;g=meta.k8s.io,…` and prints whatever
columns the server sends. For custom resources a real server builds them from the CRD's
`additionalPrinterColumns` (JSONPath, typed; `date` cells humanised as ages) after a Name column,
and adds Age only when the CRD declares no columns at all. Built-in types get the columns a real
server shows for them, for the few we serve. This is how a test proves that `kubectl get pgr`
shows Phase/Backup/Progress/Primary/Age from the CRD alone.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tests.kubeapi import jsonpath
from tests.kubeapi.resources import ResourceType

TABLE_MEDIA = "application/json;as=Table;v=v1;g=meta.k8s.io"


def wants_table(accept: str) -> bool:
    """Whether the client prefers a Table (kubectl lists it first in Accept)."""
    first = accept.split(",", maxsplit=1)[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def human_duration(seconds: float) -> str:
    """Port of k8s.io/apimachinery/pkg/util/duration.HumanDuration (what AGE columns show)."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 60 * 2:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        rest = secs % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if rest == 0 else f"{years}y{rest}d"
    return f"{hours // 24 // 365}y"


def _age(value: Any) -> str | None:
    when = parse_time(value)
    if when is None:
        return None
    return human_duration((datetime.datetime.now(datetime.UTC) - when).total_seconds())


def _cell(column: Mapping[str, Any], obj: Mapping[str, Any]) -> Any:
    """One printer-column cell as the apiextensions table convertor renders it."""
    try:
        found = jsonpath.evaluate(obj, str(column.get("jsonPath", "")))
    except jsonpath.JSONPathError:
        return "<invalid>"
    if not found:
        return None
    value = found[0]
    kind = column.get("type", "string")
    if kind == "date":
        return _age(value) or "<invalid>"
    if kind == "integer" and isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _column(name: str, kind: str = "string", fmt: str = "", description: str = "",
            priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": kind, "format": fmt, "description": description,
            "priority": priority}


_NAME = _column("Name", fmt="name", description="Name must be unique within a namespace.")
_AGE = _column("Age", "string", description="CreationTimestamp is a timestamp representing the "
               "server time when this object was created.")

Row = Callable[[Mapping[str, Any]], list[Any]]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _event_object(obj: Mapping[str, Any]) -> str:
    ref = obj.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(obj: Mapping[str, Any]) -> str | None:
    return _age(obj.get("lastTimestamp") or obj.get("eventTime")
                or _meta(obj).get("creationTimestamp"))


# Built-in types: the columns a real server prints for them.
_BUILTIN_TABLES: dict[tuple[str, str], tuple[list[dict[str, Any]], Row]] = {
    ("", "events"): (
        [_column("Last Seen"), _column("Type"), _column("Reason"), _column("Object"),
         _column("Message")],
        lambda o: [_event_last_seen(o), o.get("type"), o.get("reason"), _event_object(o),
                   o.get("message")],
    ),
    ("", "secrets"): (
        [_NAME, _column("Type"), _column("Data", "string"), _AGE],
        lambda o: [_meta(o).get("name"), o.get("type", "Opaque"), len(o.get("data") or {}),
                   _age(_meta(o).get("creationTimestamp"))],
    ),
    ("", "namespaces"): (
        [_NAME, _column("Status"), _AGE],
        lambda o: [_meta(o).get("name"), (o.get("status") or {}).get("phase"),
                   _age(_meta(o).get("creationTimestamp"))],
    ),
    ("apiextensions.k8s.io", "customresourcedefinitions"): (
        [_NAME, _column("Created At", "date")],
        lambda o: [_meta(o).get("name"), _meta(o).get("creationTimestamp")],
    ),
}


def columns_and_row(resource: ResourceType, version: str) -> tuple[list[dict[str, Any]], Row]:
    if resource.key in _BUILTIN_TABLES:
        return _BUILTIN_TABLES[resource.key]
    declared = resource.columns(version)
    if not resource.custom or not declared:
        return [_NAME, _AGE], lambda o: [_meta(o).get("name"),
                                         _age(_meta(o).get("creationTimestamp"))]
    columns = [_NAME] + [
        _column(str(c.get("name", "")), str(c.get("type", "string")), str(c.get("format", "")),
                str(c.get("description", "")), int(c.get("priority", 0)))
        for c in declared
    ]
    return columns, lambda o: [_meta(o).get("name")] + [_cell(c, o) for c in declared]


def _row_object(obj: Mapping[str, Any], include: str) -> dict[str, Any] | None:
    if include == "None":
        return None
    if include == "Object":
        return dict(obj)
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": dict(_meta(obj))}


def table(
    resource: ResourceType,
    version: str,
    objects: Sequence[Mapping[str, Any]],
    *,
    resource_version: str,
    include_object: str = "Metadata",
    continue_token: str = "",
    with_columns: bool = True,
) -> dict[str, Any]:
    columns, row = columns_and_row(resource, version)
    result: dict[str, Any] = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "rows": [{"cells": row(obj), "object": _row_object(obj, include_object)}
                 for obj in objects],
    }
    if continue_token:
        result["metadata"]["continue"] = continue_token
    if with_columns:
        result["columnDefinitions"] = columns
    return result
