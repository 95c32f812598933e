"""The three PATCH flavours clients send, applied as a real API server applies them.

- `application/merge-patch+json` (RFC 7386): kopf for every body/status change, `kubectl apply`
  and `kubectl patch --type=merge` for custom resources. `null` deletes, lists are replaced.
- `application/json-patch+json` (RFC 6902): kopf for finalizers, always prefixed with a `test`
  of `/metadata/resourceVersion`; a failed test must be 422 so kopf retries on a fresher body.
- `application/strategic-merge-patch+json`: `kubectl apply` re-applying a built-in type
  (Secret, Namespace). Approximated as a merge patch after stripping the `$…` directives; list
  merge keys are not modelled (lists are replaced), which is right for the types we re-apply.
  A real server refuses it for custom resources (415), and so does the emulator.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch  # type: ignore[import-untyped]  # no stubs published
import jsonpointer  # type: ignore[import-untyped]  # no stubs published

MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


class PatchError(ValueError):
    """The patch cannot be applied: 422 Unprocessable Entity (a failed JSON-patch test too)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_directives(patch: Any) -> Any:
    if isinstance(patch, dict):
        return {
            key: _strip_directives(value) for key, value in patch.items()
            if not key.startswith("$")
        }
    if isinstance(patch, list):
        return [_strip_directives(item) for item in patch
                if not (isinstance(item, dict) and "$patch" in item)]
    return patch


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    return merge_patch(target, _strip_directives(patch))


def json_patch(target: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, ops, in_place=False)
    except jsonpatch.JsonPatchTestFailed as e:
        raise PatchError(f"the server rejected our request due to an error in our request: "
                         f"testing value failed: {e}") from e
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
        raise PatchError(f"the server rejected our request due to an error in our request: "
                         f"{e}") from e
