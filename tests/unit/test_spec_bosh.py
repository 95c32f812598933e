"""`spec.target.bosh`: the CRD and the typed model agree — exactly one of nodes + ssh or bosh
(CEL and model), the new patterns are the model's, and only a9sLogical plans accept it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pgrecovery.engine import spec as spec_module
from tests.unit.test_crd import _cel_errors, _sample, _schema, _schema_errors, _walk

pytestmark = pytest.mark.unit

BOSH = {
    "director": "https://10.0.0.6:25555",
    "caCertSecretRef": {"name": "bosh-ca", "key": "ca.crt"},
    "credentialsSecretRef": {"name": "bosh-creds"},
}


def _bosh_sample() -> dict[str, Any]:
    obj = copy.deepcopy(_sample())
    target = obj["spec"]["target"]
    target.pop("nodes")
    target.pop("ssh")
    target["bosh"] = copy.deepcopy(BOSH)
    return obj


def test_bosh_alone_is_valid_and_defaults_the_group() -> None:
    obj = _bosh_sample()
    assert _schema_errors(obj) == []
    assert _cel_errors(obj) == []
    spec = spec_module.parse_spec(obj["spec"])
    assert spec.target.bosh is not None
    assert spec.target.bosh.instance_group == "pg"
    assert spec.target.nodes is None


@pytest.mark.parametrize(
    "change",
    [
        "both",  # bosh and nodes + ssh
        "neither",
        "nodes-only",  # nodes without ssh (and no bosh)
    ],
)
def test_exactly_one_way_to_the_vms(change: str) -> None:
    obj = _bosh_sample()
    target = obj["spec"]["target"]
    full = _sample()["spec"]["target"]
    if change == "both":
        target["nodes"], target["ssh"] = full["nodes"], full["ssh"]
    elif change == "neither":
        target.pop("bosh")
    else:
        target.pop("bosh")
        target["nodes"] = full["nodes"]
    assert any("exactly one of target.nodes" in e for e in _cel_errors(obj)), change
    with pytest.raises(spec_module.InvalidSpec, match=r"exactly one of target\.nodes"):
        spec_module.parse_spec(obj["spec"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("director", "http://10.0.0.6:25555"),  # TLS only
        ("director", "https://10.0.0.6:25555/x;rm"),
        ("instanceGroup", "PG"),
        ("deployment", "other"),  # must equal target.deployment
    ],
)
def test_bad_bosh_values_are_refused(field: str, value: str) -> None:
    obj = _bosh_sample()
    obj["spec"]["target"]["bosh"][field] = value
    with pytest.raises(spec_module.InvalidSpec):
        spec_module.parse_spec(obj["spec"])


def test_patterns_match_the_typed_model() -> None:
    by_path = {path: node.get("pattern") for path, node in _walk(_schema())}
    assert by_path[".spec.target.bosh.director"] == spec_module.DIRECTOR_PATTERN
    assert by_path[".spec.target.bosh.instanceGroup"] == spec_module.INSTANCE_GROUP_PATTERN
    assert by_path[".spec.target.bosh.deployment"] == spec_module.DEPLOYMENT_PATTERN
    assert by_path[".spec.target.bosh.gateway.host"] == spec_module.ADDRESS_PATTERN
    assert by_path[".spec.target.bosh.gateway.user"] == spec_module.SSH_USER_PATTERN


def test_nodes_of_a_bosh_target_say_the_director_is_used() -> None:
    spec = spec_module.parse_spec(_bosh_sample()["spec"])
    with pytest.raises(spec_module.InvalidSpec, match=r"through the director"):
        spec.target.require_nodes()
