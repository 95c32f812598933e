"""Offline validation of what a real API server would check on the PgRecovery CRD.

The API emulator validates nothing, so this is where the contract is enforced: the CRD passes
`kubernetes-validate --strict`, its schema is structural and documented, samples validate
against its own openAPIV3Schema (with formats), the CEL rules are evaluated with cel-python on
valid and invalid objects, and the patterns equal those of the typed model.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from pgrecovery.engine import spec as spec_module

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "pgrecovery.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("pgrecovery-*.yaml"))


def _crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _sample(name: str = "pgrecovery-s3.yaml") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())
    return doc


def _walk(node: dict[str, Any], path: str = ""):  # type: ignore[no-untyped-def]
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(
        _schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def _cel_errors(obj: dict[str, Any]) -> list[str]:
    """Evaluate every x-kubernetes-validations rule at each place it applies in `obj`."""
    env = celpy.Environment()
    failures: list[str] = []

    def visit(schema: dict[str, Any], value: Any, path: str) -> None:
        if value is None:
            return
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
                failures.append(f"{path}: {rule['message']}")
        if isinstance(value, dict):
            for name, child in (schema.get("properties") or {}).items():
                visit(child, value.get(name), f"{path}.{name}")
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                visit(schema["items"], item, f"{path}[{index}]")

    visit(_schema(), obj, "")
    return failures


def test_crd_passes_kubernetes_validate_strict() -> None:
    result = subprocess.run(
        ["kubernetes-validate", "--strict", str(CRD_PATH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_crd_names_scope_and_subresources() -> None:
    crd = _crd()
    assert crd["spec"]["group"] == "pgrecovery.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["pgr"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Backup", "Progress", "Primary", "Age"]


def test_schema_is_structural_and_every_field_is_described() -> None:
    undocumented, untyped = [], []
    for path, node in _walk(_schema()):
        if path in (".metadata",):
            continue
        # list items and map values are described by their parent field
        if path and not path.endswith(("[]", "{}")) and not node.get("description"):
            undocumented.append(path)
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            untyped.append(path)
    assert undocumented == []
    assert untyped == []


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_validate_against_the_schema_and_cel(sample: Path) -> None:
    obj = yaml.safe_load(sample.read_text())
    assert _schema_errors(obj) == []
    assert _cel_errors(obj["spec"] and obj) == []
    spec_module.parse_spec(obj["spec"])  # and the typed model agrees


def _mutate(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(_sample())
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


_DELETE = object()

INJECTIONS = ["; rm -rf /", "$(reboot)", "`id`", "a'b", 'a"b', "a\nb", "pg/0 && true", "../etc"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.source.backupGuid", "not-a-guid"),
        ("spec.source.backupId", "de2fe9e4-6535-423d-8709-dca87df7985c-123"),
        ("spec.source.type", "pgBackRest"),
        ("spec.source.encryption.digest", "sha1"),
        ("spec.target.nodes.0.name", "pg-0"),
        ("spec.target.nodes.0.address", "10.0.0.10; rm -rf /"),
        ("spec.target.ssh.port", 70000),
        ("spec.target.postgresMajorVersion", 9),
        *[("spec.target.deployment", bad) for bad in INJECTIONS],
        *[("spec.target.nodes.0.name", bad) for bad in INJECTIONS],
        *[("spec.target.nodes.0.address", bad) for bad in INJECTIONS],
        *[("spec.target.ssh.user", bad) for bad in INJECTIONS],
        *[("spec.source.s3.bucket", bad) for bad in INJECTIONS],
        *[("spec.source.s3.prefix", bad) for bad in INJECTIONS if bad != "../etc"],
        ("spec.source.encryption.keySecretRef.key", "a key"),
        ("spec.target.nodes", []),
        ("spec.target.ssh.knownHostsSecretRef", _DELETE),
    ],
)
def test_invalid_values_are_rejected_by_schema_and_model(path: str, value: Any) -> None:
    obj = _mutate(path, value)
    assert _schema_errors(obj), f"schema accepted {path}={value!r}"
    with pytest.raises(spec_module.InvalidSpec) as info:
        spec_module.parse_spec(obj["spec"])
    assert info.value.field is not None
    assert info.value.field.startswith("spec.")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"azure": {"container": "abc", "credentialsSecretRef": {"name": "x"}}}, "exactly one"),
        ({"s3": _DELETE}, "exactly one"),
        ({"backupId": "0e2fe9e4-6535-423d-8709-dca87df7985c-1740130000123"}, "backupGuid"),
        ({"encryption": _DELETE}, "encrypted"),
    ],
)
def test_cel_rules_on_source(change: dict[str, Any], message: str) -> None:
    obj = copy.deepcopy(_sample())
    for key, value in change.items():
        if value is _DELETE:
            del obj["spec"]["source"][key]
        else:
            obj["spec"]["source"][key] = value
    errors = _cel_errors(obj)
    assert any(message in e for e in errors), errors
    with pytest.raises(spec_module.InvalidSpec):
        spec_module.parse_spec(obj["spec"])


def test_cel_rule_point_in_time_only_with_wale() -> None:
    obj = copy.deepcopy(_sample())
    obj["spec"]["pointInTime"] = {"targetTime": "2026-11-21T10:00:00Z"}
    assert any("pointInTime" in e for e in _cel_errors(obj))
    with pytest.raises(spec_module.InvalidSpec, match="pointInTime"):
        spec_module.parse_spec(obj["spec"])
    obj["spec"]["source"]["type"] = "walE"
    obj["spec"]["source"].pop("encryption")
    assert _cel_errors(obj) == []
    spec_module.parse_spec(obj["spec"])


def test_patterns_match_the_typed_model() -> None:
    by_path = {path: node.get("pattern") for path, node in _walk(_schema())}
    expected = {
        ".spec.source.backupGuid": spec_module.GUID_PATTERN,
        # the CRD also admits "" (= latest); the model maps "" to None first
        ".spec.source.backupId": "^$|" + spec_module.BACKUP_ID_PATTERN,
        ".spec.target.nodes[].name": spec_module.NODE_NAME_PATTERN,
        ".spec.target.nodes[].address": spec_module.ADDRESS_PATTERN,
        ".spec.target.deployment": spec_module.DEPLOYMENT_PATTERN,
        ".spec.target.ssh.user": spec_module.SSH_USER_PATTERN,
        ".spec.source.s3.bucket": spec_module.BUCKET_PATTERN,
        ".spec.source.s3.prefix": spec_module.PREFIX_PATTERN,
        ".spec.source.s3.region": spec_module.REGION_PATTERN,
        ".spec.source.s3.endpoint": spec_module.URL_PATTERN,
        ".spec.source.azure.container": spec_module.CONTAINER_PATTERN,
        ".spec.source.azure.accountUrl": spec_module.URL_PATTERN,
        ".spec.source.encryption.keySecretRef.name": spec_module.K8S_NAME_PATTERN,
        ".spec.source.encryption.keySecretRef.key": spec_module.SECRET_KEY_PATTERN,
    }
    for path, pattern in expected.items():
        assert by_path[path] == pattern, path
        re.compile(pattern)
