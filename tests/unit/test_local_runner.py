"""Local mode with the test-only plan: status file after each change, interrupt and --resume."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.adapters.local_secrets import LocalSecrets, env_name
from pgrecovery.engine.local import LocalRun, run_local
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.spec import SecretKeyRef
from pgrecovery.engine.status import ConditionType, RecoveryStatus
from pgrecovery.errors import Cancelled, ConfigurationError, SecretError
from tests.e2e.plan_for_tests import build_plan

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def spec(**changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests/samples/pgrecovery-s3.yaml").read_text())
    raw: dict[str, Any] = copy.deepcopy(doc["spec"])
    raw.update(changes)
    return raw


def local_run(tmp_path: Path, raw: dict[str, Any]) -> LocalRun:
    return LocalRun(
        name="local-test",
        spec=raw,
        status_file=tmp_path / "status.json",
        work_dir=tmp_path / "work",
        secrets=LocalSecrets(None, {}),
        plan_factory=build_plan,
    )


def applies(tmp_path: Path) -> list[str]:
    return (tmp_path / "work" / "applies.log").read_text().split()


async def test_local_run_walks_all_phases_and_writes_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGRECOVERY_TEST_STEP_SECONDS", "0.01")
    seen: list[Phase] = []
    final = await run_local(
        local_run(tmp_path, spec()),
        resume=False,
        on_event=lambda _e, s: seen.append(s.phase),
    )
    assert final.phase is Phase.REJOINED
    assert final.is_true(ConditionType.SUCCEEDED)
    assert [p for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p] == [
        Phase.FETCHING,
        Phase.DECRYPTING,
        Phase.STAGING,
        Phase.RESTORING,
        Phase.REJOINED,
    ]
    document = json.loads((tmp_path / "status.json").read_text())
    assert RecoveryStatus.from_dict(document["status"]) == final
    assert len(applies(tmp_path)) == 10


async def test_existing_status_file_requires_resume(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="--resume"):
        await run_local(local_run(tmp_path, spec()), resume=False, on_event=lambda _e, _s: None)


async def test_interrupted_run_resumes_without_repeating_finished_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGRECOVERY_TEST_STEP_SECONDS", "0.05")
    cancel = asyncio.Event()

    def interrupt_in_staging(_event: object, status: RecoveryStatus) -> None:
        if status.phase is Phase.STAGING:
            cancel.set()

    with pytest.raises(Cancelled):
        await run_local(
            local_run(tmp_path, spec()),
            resume=False,
            on_event=interrupt_in_staging,
            cancel_event=cancel,
        )
    stored = json.loads((tmp_path / "status.json").read_text())["status"]
    assert stored["phase"] == "Staging"
    assert "--resume" in stored["message"]
    before = applies(tmp_path)
    final = await run_local(local_run(tmp_path, spec()), resume=True, on_event=lambda _e, _s: None)
    assert final.is_true(ConditionType.SUCCEEDED)
    after = applies(tmp_path)[len(before) :]
    assert not set(after) & {s for s in before if s.startswith(("fetching", "decrypting"))}
    assert "rejoined-2" in after


async def test_missing_confirm_blocks_before_staging_and_resume_with_confirm_proceeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGRECOVERY_TEST_STEP_SECONDS", "0.01")
    blocked = await run_local(
        local_run(tmp_path, spec(confirm="")), resume=False, on_event=lambda _e, _s: None
    )
    assert blocked.phase is Phase.STAGING
    condition = blocked.condition(ConditionType.BLOCKED)
    assert condition is not None
    assert condition.reason == "AwaitingConfirmation"
    assert not [s for s in applies(tmp_path) if s.startswith("staging")]
    final = await run_local(local_run(tmp_path, spec()), resume=True, on_event=lambda _e, _s: None)
    assert final.is_true(ConditionType.SUCCEEDED)


async def test_local_secrets_from_files_and_environment(tmp_path: Path) -> None:
    secret_dir = tmp_path / "secrets" / "a9s-pg-backup-key"
    secret_dir.mkdir(parents=True)
    key_file = secret_dir / "encryption-key"
    key_file.write_bytes(b"from-file")
    key_file.chmod(0o600)
    ref = SecretKeyRef(name="a9s-pg-backup-key", key="encryption-key")
    assert await LocalSecrets(tmp_path / "secrets", {}).get_key(ref) == b"from-file"
    key_file.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        await LocalSecrets(tmp_path / "secrets", {}).get_key(ref)
    env = {env_name("a9s-pg-backup-key", "encryption-key"): "from-env"}
    assert await LocalSecrets(None, env).get_key(ref) == b"from-env"
    with pytest.raises(SecretError, match="PGRECOVERY_SECRET_A9S_PG_BACKUP_KEY_ENCRYPTION_KEY"):
        await LocalSecrets(None, {}).get_key(ref)
