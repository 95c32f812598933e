"""The subset of Kubernetes JSONPath that CRD printer columns use.

A real server evaluates `additionalPrinterColumns[].jsonPath` (e.g. `.status.phase`,
`.status.conditions[?(@.type=="Ready")].status`, `.spec.nodes[0].name`) when `kubectl get`
asks for a Table. Our printer columns must show the same thing against the emulator, so the
emulator evaluates the same expressions. Written here rather than taken from a library because
the Kubernetes dialect (bare leading dot, `@.field` filters with quoted literals) differs from
the common Python JSONPath packages, and the subset is small.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

_FILTER_RE = re.compile(
    r"""^\?\(\s*@((?:\.[A-Za-z0-9_\-]+|\['[^']*'\]|\["[^"]*"\])+)\s*"""
    r"""(?:(==|!=|<=|>=|<|>)\s*(.+?))?\s*\)$""")


class JSONPathError(ValueError):
    """The expression is outside the supported subset or malformed."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    """Split `.a['b'][0][?(@.x=="y")]..c` into (kind, argument) steps."""
    expr = expr.strip()
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1]
    expr = expr.removeprefix("$")
    steps: list[tuple[str, str]] = []
    i = 0
    while i < len(expr):
        if expr.startswith("..", i):
            match = re.match(r"[A-Za-z0-9_\-]+|\*", expr[i + 2:])
            if not match:
                raise JSONPathError(f"bad recursive descent in {expr!r}")
            steps.append(("recurse", match.group(0)))
            i += 2 + len(match.group(0))
        elif expr[i] == ".":
            match = re.match(r"[A-Za-z0-9_\-/]+|\*", expr[i + 1:])
            if not match:
                if i + 1 == len(expr):  # a lone "." is the whole object
                    i += 1
                    continue
                raise JSONPathError(f"bad field at {i} in {expr!r}")
            steps.append(("field", match.group(0)))
            i += 1 + len(match.group(0))
        elif expr[i] == "[":
            depth, j = 0, i
            while j < len(expr):
                depth += {"[": 1, "]": -1}.get(expr[j], 0)
                if depth == 0:
                    break
                j += 1
            if j == len(expr):
                raise JSONPathError(f"unclosed bracket in {expr!r}")
            inner = expr[i + 1:j].strip()
            if inner.startswith("?"):
                steps.append(("filter", inner))
            elif inner == "*":
                steps.append(("field", "*"))
            elif inner[:1] in "'\"":
                steps.append(("field", inner[1:-1]))
            elif re.fullmatch(r"-?\d+", inner):
                steps.append(("index", inner))
            elif re.fullmatch(r"-?\d*:-?\d*", inner):
                steps.append(("slice", inner))
            else:
                raise JSONPathError(f"unsupported subscript [{inner}] in {expr!r}")
            i = j + 1
        else:
            raise JSONPathError(f"unexpected {expr[i]!r} at {i} in {expr!r}")
    return steps


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        yield from value.values()
    elif isinstance(value, list):
        yield from value


def _descendants(value: Any) -> Iterator[Any]:
    yield value
    for child in _children(value):
        yield from _descendants(child)


def _literal(text: str) -> Any:
    text = text.strip()
    if text[:1] in "'\"" and text[-1:] == text[:1]:
        return text[1:-1]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _filter(items: Sequence[Any], spec: str) -> Iterator[Any]:
    match = _FILTER_RE.match(spec)
    if not match:
        raise JSONPathError(f"unsupported filter [{spec}]")
    path, op, literal = match.groups()
    for item in items:
        found = evaluate(item, path)
        if op is None:
            if found:
                yield item
            continue
        if not found:
            continue
        left, right = found[0], _literal(literal)
        try:
            ok = {
                "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
                "<": lambda a, b: a < b, ">": lambda a, b: a > b,
                "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
            }[op](left, right)
        except TypeError:
            ok = False
        if ok:
            yield item


def evaluate(obj: Any, expr: str) -> list[Any]:
    """All values the expression selects from `obj`, in document order."""
    current: list[Any] = [obj]
    for kind, arg in _tokens(expr):
        nxt: list[Any] = []
        for value in current:
            if kind == "field" and arg == "*":
                nxt.extend(_children(value))
            elif kind == "field":
                if isinstance(value, Mapping) and arg in value:
                    nxt.append(value[arg])
            elif kind == "index":
                if isinstance(value, list) and -len(value) <= int(arg) < len(value):
                    nxt.append(value[int(arg)])
            elif kind == "slice":
                if isinstance(value, list):
                    start, _, stop = arg.partition(":")
                    nxt.extend(value[int(start) if start else None:int(stop) if stop else None])
            elif kind == "filter":
                nxt.extend(_filter(list(_children(value)), arg))
            elif kind == "recurse":
                for node in _descendants(value):
                    if arg == "*":
                        nxt.extend(_children(node))
                    elif isinstance(node, Mapping) and arg in node:
                        nxt.append(node[arg])
        current = nxt
    return current
