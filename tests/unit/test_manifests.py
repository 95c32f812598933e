"""The plain install (`manifests/`), its samples, and the operator image's Dockerfile.

Why this module exists: `kubectl apply -k manifests/` is the install for people without Helm,
so it must build with the real kustomize (kubectl's), every object must pass
`kubernetes-validate --strict`, its CRD must be the one in `crds/`, it must stay the chart's
default install, and the sample Secrets must be exactly the ones the samples reference. Docker
cannot run here, so the Dockerfile is checked by reading it: non-root, no test extras.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"


def _validate(path: Path) -> str:
    result = subprocess.run(
        ["kubernetes-validate", "--strict", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def kustomize_build() -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomization_builds_the_whole_install(tmp_path: Path) -> None:
    objects = kustomize_build()
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
        ]
    )
    for obj in objects:
        if obj["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ):
            assert obj["metadata"]["namespace"] == "pgrecovery", obj["metadata"]
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert _validate(path).count("passed") == len(objects)


def _api_object_files() -> list[Path]:
    """Every YAML under manifests/ that kubernetes-validate can judge: not the kustomization
    (built and validated by the test above) and not the PgRecovery samples (kubernetes-validate
    knows only built-in kinds; test_crd.py checks them against the CRD's own schema)."""
    files = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        if all(doc["kind"] == "PgRecovery" for doc in docs):
            continue
        files.append(path)
    return files


@pytest.mark.parametrize("path", _api_object_files(), ids=lambda p: p.name)
def test_every_manifest_file_passes_kubernetes_validate(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert _validate(path).count("passed") == len(docs)


def test_manifests_crd_is_a_copy_of_crds() -> None:
    assert (MANIFESTS / "crds" / "pgrecovery.yaml").read_bytes() == (
        ROOT / "crds" / "pgrecovery.yaml"
    ).read_bytes(), "cp crds/pgrecovery.yaml manifests/crds/"


def test_manifests_are_the_charts_default_install() -> None:
    helm_chart = pytest.importorskip("tests.unit.test_helm_chart")
    chart = {
        (o["kind"], o["metadata"]["name"].replace("-observer", "")): o for o in helm_chart.render()
    }
    plain = {
        (o["kind"], o["metadata"]["name"].replace("-observer", "")): o for o in kustomize_build()
    }
    for kind in ("Role", "ClusterRole"):
        assert (
            plain[(kind, "pgrecovery-operator")]["rules"]
            == chart[(kind, "pgrecovery-operator")]["rules"]
        ), kind
    chart_pod = chart[("Deployment", "pgrecovery-operator")]["spec"]["template"]["spec"]
    plain_pod = plain[("Deployment", "pgrecovery-operator")]["spec"]["template"]["spec"]
    for key in ("securityContext", "volumes"):
        assert plain_pod[key] == chart_pod[key], key
    chart_container, plain_container = chart_pod["containers"][0], plain_pod["containers"][0]
    for key in (
        "command",
        "args",
        "env",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
        "volumeMounts",
    ):
        assert plain_container[key] == chart_container[key], key


def _secret_refs(node: Any) -> set[tuple[str, str | None]]:
    refs: set[tuple[str, str | None]] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("SecretRef"):
                refs.add((value["name"], value.get("key")))
            else:
                refs |= _secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            refs |= _secret_refs(item)
    return refs


def test_sample_secrets_are_exactly_the_referenced_ones() -> None:
    secrets = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all((MANIFESTS / "samples" / "secrets.yaml").read_text())
    }
    refs: set[tuple[str, str | None]] = set()
    for sample in (MANIFESTS / "samples").glob("pgrecovery-*.yaml"):
        refs |= _secret_refs(yaml.safe_load(sample.read_text())["spec"])
    assert {name for name, _ in refs} == set(secrets)
    for name, key in refs:
        if key is not None:
            assert key in secrets[name]["stringData"], (name, key)
    assert set(secrets["backup-store-s3"]["stringData"]) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert set(secrets["backup-store-azure"]["stringData"]) == {"AZURE_STORAGE_CONNECTION_STRING"}
    for secret in secrets.values():
        assert secret["metadata"]["namespace"] == "pgrecovery"
        assert all("REPLACE" in value for value in secret["stringData"].values())


# ---------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_runs_as_non_root_without_test_extras() -> None:
    instructions = _dockerfile()
    known = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {word for word, _ in instructions} <= known
    froms = [args for word, args in instructions if word == "FROM"]
    assert all(args.startswith("python:3.11-slim") for args in froms), froms
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # USER comes before the entry point
    assert [w for w, _ in final].index("USER") < [w for w, _ in final].index("ENTRYPOINT")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    for banned in ("[test]", "[dev]", ".[", "pytest", "moto", "kmock", "helm-python-sdk"):
        assert banned not in runs, banned
    entry = yaml.safe_load([a for w, a in final if w == "ENTRYPOINT"][-1])
    assert entry == ["kopf", "run", "-m", "pgrecovery.main"]
    assert shlex.split(runs)  # the shell lines at least tokenize
    # The WAL-E reader loads liblzo2 through ctypes: the runtime stage must install it.
    final_runs = " ".join(args for word, args in final if word == "RUN")
    assert "liblzo2-2" in final_runs


def test_dockerignore_keeps_tests_out() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", ".ci/constraints.txt", "operator"}
    copied = {
        part
        for word, args in _dockerfile()
        if word == "COPY" and "--from" not in args
        for part in args.split()[:-1]
    }
    assert copied <= included, copied - included
