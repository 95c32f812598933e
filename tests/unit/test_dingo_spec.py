"""`target.type: dingo` in the CRD and in the typed model: the same patterns, the same rules.

The CRD (schema + CEL, evaluated offline with cel-python as a real API server would) and the
pydantic model must accept the same Dingo recoveries and refuse the same bad ones, because the
API emulator and local recovery files are validated only by the model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from pgrecovery.engine import spec as spec_module

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OLD = "6e101b27-ee1b-4f4d-a032-4401a3709ec3"
NEW = "ca5a7d15-1422-4408-a00d-93194350a106"

DINGO: dict[str, Any] = {
    "apiVersion": "pgrecovery.dev/v1alpha1",
    "kind": "PgRecovery",
    "metadata": {"name": "important-db", "namespace": "pgrecovery"},
    "spec": {
        "source": {
            "type": "walE",
            "backupGuid": OLD,
            "s3": {
                "bucket": "our-dingo-postgresql-backups",
                "region": "ap-southeast-1",
                "credentialsSecretRef": {"name": "dingo-backups-s3"},
            },
        },
        "target": {
            "type": "dingo",
            "deployment": "dingo-postgresql-98b09c4b36af74181ee1",
            "nodes": [{"name": "cell_z1/0", "address": "10.0.0.20"}],
            "ssh": {
                "user": "bosh_recovery",
                "privateKeySecretRef": {"name": "dingo-ssh", "key": "id_ed25519"},
                "knownHostsSecretRef": {"name": "dingo-ssh", "key": "known_hosts"},
            },
            "dingo": {
                "instanceId": NEW,
                "container": "cf-52167ceb-bd3d-4bff-8699-a239d21c5379",
                "etcd": {"endpoint": "http://10.0.0.5:4001"},
            },
        },
        "confirm": "dingo-postgresql-98b09c4b36af74181ee1",
    },
}


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "pgrecovery.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema())
    return [e.message for e in validator.iter_errors(obj)]


def _cel_errors(obj: dict[str, Any]) -> list[str]:
    env = celpy.Environment()
    failures: list[str] = []

    def visit(schema: dict[str, Any], value: Any) -> None:
        if value is None:
            return
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
                failures.append(rule["message"])
        if isinstance(value, dict):
            for name, child in (schema.get("properties") or {}).items():
                visit(child, value.get(name))
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            for item in value:
                visit(schema["items"], item)

    visit(_schema(), obj)
    return failures


def _dingo(**changes: Any) -> dict[str, Any]:
    """DINGO with `changes` applied: dotted paths under spec; None deletes."""
    obj = copy.deepcopy(DINGO)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = obj["spec"]
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return obj


def test_a_dingo_recovery_is_valid_for_the_crd_and_the_model() -> None:
    assert _schema_errors(DINGO) == []
    assert _cel_errors(DINGO) == []
    spec = spec_module.parse_spec(DINGO["spec"])
    assert spec.target.dingo is not None
    assert spec.target.dingo.instance_id == NEW
    assert spec.target.dingo.etcd.endpoint == "http://10.0.0.5:4001"
    # container and etcd are optional (found on the cells / read from the container)
    minimal = _dingo(target__dingo={"instanceId": NEW})
    assert _schema_errors(minimal) == []
    assert _cel_errors(minimal) == []
    parsed = spec_module.parse_spec(minimal["spec"])
    assert parsed.target.dingo is not None
    assert parsed.target.dingo.container is None


def test_dingo_patterns_equal_the_models() -> None:
    dingo = _schema()["properties"]["spec"]["properties"]["target"]["properties"]["dingo"]
    props = dingo["properties"]
    assert props["instanceId"]["pattern"] == spec_module.GUID_PATTERN
    assert props["container"]["pattern"] == spec_module.CONTAINER_NAME_PATTERN
    assert props["etcd"]["properties"]["endpoint"]["pattern"] == (spec_module.ETCD_ENDPOINT_PATTERN)
    crd_copy = (ROOT / "manifests" / "crds" / "pgrecovery.yaml").read_text()
    assert crd_copy == (ROOT / "crds" / "pgrecovery.yaml").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target__dingo": None}, "target.dingo is required"),
        ({"target__type": "a9sPg"}, "only valid with it"),
        (
            {
                "source__type": "a9sLogical",
                "source__encryption": {"keySecretRef": {"name": "k", "key": "k"}},
            },
            "source.type must be walE",
        ),
        ({"pointInTime": {"targetTime": "2026-11-21T10:00:00Z"}}, "pointInTime"),
        ({"target__dingo": {"instanceId": OLD}}, "not the deleted one"),
    ],
)
def test_rules_refuse_inconsistent_dingo_specs(changes: dict[str, Any], message: str) -> None:
    obj = _dingo(**changes)
    assert any(message in e for e in _cel_errors(obj)), _cel_errors(obj)
    with pytest.raises(spec_module.InvalidSpec):
        spec_module.parse_spec(obj["spec"])


@pytest.mark.parametrize(
    "dingo",
    [
        {"instanceId": "CA5A7D15-1422-4408-A00D-93194350A106"},
        {"instanceId": NEW, "container": "cf-x; docker rm -f $(docker ps -q)"},
        {"instanceId": NEW, "container": "-rf"},
        {"instanceId": NEW, "container": "../../etc"},
        {"instanceId": NEW, "etcd": {"endpoint": "http://10.0.0.5:4001/v2/keys/../"}},
        {"instanceId": NEW, "etcd": {"endpoint": "10.0.0.5:4001"}},
        {"instanceId": NEW, "etcd": {"endpoint": "http://$(id):4001"}},
    ],
)
def test_bad_dingo_values_are_refused_by_schema_and_model(dingo: dict[str, Any]) -> None:
    obj = _dingo(target__dingo=dingo)
    assert _schema_errors(obj), dingo
    with pytest.raises(spec_module.InvalidSpec) as info:
        spec_module.parse_spec(obj["spec"])
    assert info.value.field is not None
    assert info.value.field.startswith("spec.target.dingo")
