"""Injection attempts in every spec string that can reach a remote command, SQL, a store
request or a local path: rejected by the CRD (OpenAPI schema + CEL, checked offline with the
validators of test_crd.py) AND by the typed model (`parse_spec`), which must agree.

The few values that both accept are listed in ACCEPTED with the reason they are harmless
(e.g. a Secret data key `--option` is only ever a dictionary key or a file name inside the
secrets directory); tests/integration/test_injection_harmless.py then proves that even values
that got through would arrive literally at the VM and at PostgreSQL.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.engine.spec import parse_spec
from pgrecovery.errors import InvalidSpec
from tests.unit.test_crd import _cel_errors, _schema_errors

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"

PAYLOADS: dict[str, str] = {
    "semicolon": "; rm -rf /",
    "subshell": "$(touch /tmp/pwned)",
    "backticks": "`touch /tmp/pwned`",
    "single-quote": "x' OR '1'='1",
    "double-quote": 'x"; DROP DATABASE shop; --',
    "newline": "pg-0\ntouch /tmp/pwned",
    "leading-dashes": "--option",
    "nul": "a\x00b",
    "long": "a" * 5000,
    "path-traversal": "../../etc/passwd",
    "and-list": "pg/0 && touch /tmp/pwned",
}

# Every spec string that leaves the operator: (sample, dotted path, where it goes).
FIELDS: list[tuple[str, str, str]] = [
    ("s3", "spec.target.deployment", "messages, lock index; compared with confirm"),
    ("s3", "spec.target.nodes.0.name", "job ids, status, messages"),
    ("s3", "spec.target.nodes.0.address", "SSH host, pg_hba lines, SQL"),
    ("s3", "spec.target.ssh.user", "SSH login"),
    ("s3", "spec.target.ssh.privateKeySecretRef.name", "Secret read / secrets dir path"),
    ("s3", "spec.target.ssh.privateKeySecretRef.key", "Secret data key / file name"),
    ("s3", "spec.target.ssh.knownHostsSecretRef.name", "Secret read / secrets dir path"),
    ("s3", "spec.target.ssh.knownHostsSecretRef.key", "Secret data key / file name"),
    ("s3", "spec.source.backupGuid", "object keys, remote file names, job ids"),
    ("s3", "spec.source.backupId", "object keys, remote file names, job ids"),
    ("s3", "spec.source.s3.bucket", "S3 requests"),
    ("s3", "spec.source.s3.prefix", "S3 key prefix"),
    ("s3", "spec.source.s3.region", "S3 signing"),
    ("s3", "spec.source.s3.endpoint", "S3 endpoint URL"),
    ("s3", "spec.source.s3.credentialsSecretRef.name", "Secret read / secrets dir path"),
    ("s3", "spec.source.encryption.keySecretRef.name", "Secret read / secrets dir path"),
    ("s3", "spec.source.encryption.keySecretRef.key", "Secret data key / file name"),
    ("azure", "spec.source.azure.container", "Azure requests"),
    ("azure", "spec.source.azure.accountUrl", "Azure account URL"),
    ("azure", "spec.source.azure.credentialsSecretRef.name", "Secret read / secrets dir path"),
    ("s3", "spec.confirm", "compared with target.deployment only"),
]

_SECRET_KEY_REASON = (
    "a Secret data key (Kubernetes allows `-` first as well): only a dictionary key, or a file "
    "name inside `<secrets-dir>/<secret>/`; never a command, SQL or a remote path"
)
_CONFIRM_REASON = (
    "confirm never leaves the operator: it is only compared with target.deployment, and any "
    "other value keeps the destructive phases gated (asserted below)"
)
ACCEPTED: dict[tuple[str, str], str] = {
    ("spec.target.ssh.privateKeySecretRef.key", "leading-dashes"): _SECRET_KEY_REASON,
    ("spec.target.ssh.knownHostsSecretRef.key", "leading-dashes"): _SECRET_KEY_REASON,
    ("spec.source.encryption.keySecretRef.key", "leading-dashes"): _SECRET_KEY_REASON,
    ("spec.source.s3.prefix", "leading-dashes"): (
        "an S3 `prefix` request parameter; local part files are named without it"
    ),
    ("spec.source.s3.prefix", "path-traversal"): (
        "an S3 `prefix` request parameter (object keys may contain `..`); local part files are "
        "named without it"
    ),
    ("spec.source.s3.region", "leading-dashes"): (
        "a signing region name for botocore; never a command or a path"
    ),
    **{
        ("spec.confirm", payload): _CONFIRM_REASON
        for payload, value in PAYLOADS.items()
        if len(value) <= 63
    },
}

def _sample(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / f"pgrecovery-{kind}.yaml").read_text())
    return doc


def _with(kind: str, path: str, value: str) -> dict[str, Any]:
    obj = copy.deepcopy(_sample(kind))
    *parents, last = path.split(".")
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return obj


@functools.cache  # the tally below reuses the parametrized test's verdicts (CEL is slow)
def _verdict(kind: str, path: str, payload: str) -> str:
    """`rejected` (by CRD and model), `accepted-harmless` (by both, listed in ACCEPTED), or
    the problem found."""
    value = PAYLOADS[payload]
    obj = _with(kind, path, value)
    crd_errors = _schema_errors(obj) + _cel_errors(obj)
    try:
        parsed = parse_spec(obj["spec"])
    except InvalidSpec as exc:
        if ACCEPTED.get((path, payload)) is not None:
            return f"the model rejects {path}={value!r} listed as harmless: {exc}"
        if not crd_errors:
            return f"the CRD accepts {path}={value!r}"
        # The error names the field (list indexes included), so the user knows what to fix.
        if exc.field is None or not exc.field.startswith(path.rsplit(".", 1)[0]):
            return f"the model's error names {exc.field!r}, not {path}"
        return "rejected"
    if ACCEPTED.get((path, payload)) is None:
        return f"the model accepts {path}={value!r}"
    if crd_errors:
        return f"the CRD rejects {path}={value!r} but the model accepts it: {crd_errors}"
    if path == "spec.confirm" and parsed.confirmed:
        return "a hostile confirm value ungated the destructive phases"
    return "accepted-harmless"


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize(("kind", "path", "goes_to"), FIELDS, ids=[f[1] for f in FIELDS])
def test_injection_is_rejected_by_crd_and_model(
    kind: str, path: str, goes_to: str, payload: str
) -> None:
    verdict = _verdict(kind, path, payload)
    assert verdict in ("rejected", "accepted-harmless"), f"{verdict} (it goes to: {goes_to})"


def test_every_accepted_value_is_listed_with_a_reason() -> None:
    """ACCEPTED names only real fields and payloads, each with a reason."""
    paths = {f[1] for f in FIELDS}
    for (path, payload), reason in ACCEPTED.items():
        assert path in paths
        assert payload in PAYLOADS
        assert len(reason) > 20


def test_injection_tally(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole table at once: inputs tried / rejected safely, printed for the report."""
    tally = Counter(_verdict(kind, path, p) for kind, path, _ in FIELDS for p in PAYLOADS)
    with capsys.disabled():
        print(
            f"\ninjection inputs tried: {sum(tally.values())} ({len(FIELDS)} fields x "
            f"{len(PAYLOADS)} payloads); rejected by CRD and model: {tally['rejected']}; "
            f"accepted by both as harmless: {tally['accepted-harmless']}"
        )
    assert set(tally) <= {"rejected", "accepted-harmless"}, tally
    assert tally["accepted-harmless"] == len(ACCEPTED)
