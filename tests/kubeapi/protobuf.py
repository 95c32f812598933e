"""Decoding the protobuf bodies that `kubectl create <builtin>` sends.

kubectl's typed clients (`kubectl create secret generic`, `create configmap`, `create namespace`,
`create serviceaccount`) send `application/vnd.kubernetes.protobuf` and do not fall back to JSON
when refused. People (and our README) create the operator's Secrets that way, so the emulator
reads those few kinds: the `k8s\\0` envelope (`runtime.Unknown`) and the fields of the kinds
below that kubectl fills in. Everything else is refused with 415, as before. Responses stay JSON,
which kubectl accepts.
"""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """Not a Kubernetes protobuf body, or a kind this module cannot read."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a message: ints for varints, bytes for the rest."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            fields.append((number, data[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            fields.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    return fields


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string")
    return value.decode("utf-8")


def _map(entries: list[bytes], as_bytes: bool = False) -> dict[str, str]:
    result: dict[str, str] = {}
    for entry in entries:
        parts = dict(_fields(entry))
        key = _text(parts.get(1, b""))
        raw = parts.get(2, b"")
        if not isinstance(raw, bytes):
            raise ProtobufError("expected bytes in a map value")
        result[key] = base64.b64encode(raw).decode() if as_bytes else raw.decode("utf-8")
    return result


# Per message: field number → (JSON name, kind); kinds: str, bool, strs (repeated), map,
# bytesmap (values base64 in JSON), or a nested message name.
_SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "ObjectMeta": {1: ("name", "str"), 2: ("generateName", "str"), 3: ("namespace", "str"),
                   11: ("labels", "map"), 12: ("annotations", "map"),
                   14: ("finalizers", "strs")},
    "Secret": {1: ("metadata", "ObjectMeta"), 2: ("data", "bytesmap"), 3: ("type", "str"),
               4: ("stringData", "map"), 5: ("immutable", "bool")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map"),
                  3: ("binaryData", "bytesmap"), 4: ("immutable", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "strs")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"),
                       4: ("automountServiceAccountToken", "bool")},
}


def _message(data: bytes, schema: str) -> dict[str, Any]:
    fields = _SCHEMAS[schema]
    grouped: dict[int, list[int | bytes]] = {}
    for number, value in _fields(data):
        grouped.setdefault(number, []).append(value)
    result: dict[str, Any] = {}
    for number, values in grouped.items():
        if number not in fields:
            continue  # status, timestamps, uids: the server's to set
        name, kind = fields[number]
        value = _value(kind, values)
        if value not in ("", [], {}):  # JSON's omitempty: proto2 sends empty strings
            result[name] = value
    return result


def _value(kind: str, values: list[int | bytes]) -> Any:
    blobs = [v for v in values if isinstance(v, bytes)]
    if kind == "str":
        return _text(values[-1])
    if kind == "bool":
        return bool(values[-1])
    if kind == "strs":
        return [_text(v) for v in values]
    if kind in ("map", "bytesmap"):
        return _map(blobs, as_bytes=kind == "bytesmap")
    if not blobs:
        raise ProtobufError(f"expected a {kind} message")
    return _message(blobs[-1], kind)


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object of a supported kind."""
    if not body.startswith(MAGIC):
        raise ProtobufError("not a Kubernetes protobuf body")
    envelope = dict(_fields(body[len(MAGIC):]))
    type_meta = envelope.get(1, b"")
    raw = envelope.get(2, b"")
    if not isinstance(type_meta, bytes) or not isinstance(raw, bytes):
        raise ProtobufError("malformed envelope")
    meta = dict(_fields(type_meta))
    api_version = _text(meta.get(1, b""))
    kind = _text(meta.get(2, b""))
    if kind not in _SCHEMAS or kind in ("ObjectMeta", "NamespaceSpec"):
        raise ProtobufError(f"protobuf bodies of kind {kind or '?'} are not supported")
    return {"apiVersion": api_version, "kind": kind, **_message(raw, kind)}
