"""Label and field selectors as a real API server parses and applies them.

kopf sends `labelSelector`/`fieldSelector` only when configured to, but `kubectl wait` and
`kubectl delete --wait` watch with `fieldSelector=metadata.name=<name>`, `kubectl get -l` sends
label selectors, and `kubectl get events --field-selector involvedObject.name=…` is how people
read an object's events. Malformed selectors are a 400 on a real server and are here too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

# A label key: optional DNS-subdomain prefix and a name of [A-Za-z0-9._-]; values likewise.
_KEY = r"(?:[A-Za-z0-9.\-]+/)?[A-Za-z0-9](?:[A-Za-z0-9_.\-]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9_.\-]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")


class SelectorError(ValueError):
    """The selector cannot be parsed; the server answers 400 BadRequest."""


@dataclasses.dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value in self.values
        if self.op == "!=":
            return not present or value not in self.values
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `in (…)` value lists."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part.strip()]


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Parse `a=b,c!=d,e in (f,g),!h` into a predicate over a labels mapping."""
    requirements: list[_Requirement] = []
    for part in _split_top_level(text or ""):
        if match := _EQ_RE.match(part):
            op = "!=" if match.group(2) == "!=" else "="
            requirements.append(_Requirement(match.group(1), op, frozenset({match.group(3)})))
        elif match := _SET_RE.match(part):
            negated, key, set_op, values = match.groups()
            if set_op and negated:
                raise SelectorError(f"unable to parse requirement: {part!r}")
            if set_op:
                items = frozenset(v.strip() for v in values.split(",") if v.strip())
                requirements.append(_Requirement(key, set_op, items))
            else:
                requirements.append(_Requirement(key, "!exists" if negated else "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(req.matches(labels) for req in requirements)


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    field: str
    negated: bool
    value: str


def parse_field_selector(text: str | None) -> list[FieldRequirement]:
    """Parse `metadata.name=x,type!=Normal`; which fields are allowed is the caller's check."""
    requirements: list[FieldRequirement] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not match:
            raise SelectorError(f"invalid selector: {part!r}; can't understand {part!r}")
        requirements.append(FieldRequirement(match.group(1), match.group(2) == "!=",
                                             match.group(3)))
    return requirements


def field_value(obj: Mapping[str, Any], field: str) -> str:
    """The string form of a dotted field, "" when absent (as a real server compares it)."""
    value: Any = obj
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ""
        value = value[part]
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fields_match(obj: Mapping[str, Any], requirements: list[FieldRequirement]) -> bool:
    return all((field_value(obj, req.field) == req.value) != req.negated for req in requirements)
