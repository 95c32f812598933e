"""`pgrecovery status`: a local run's status file in words (steps under the phase they ran in)
or as the status document (-o json|yaml), with exit codes a script can wait on."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pgrecovery import cli
from pgrecovery.engine import status as st
from pgrecovery.engine.local import StatusFile
from pgrecovery.engine.phases import Phase

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _write(tmp_path: Path, status: st.RecoveryStatus) -> Path:
    manifest = tmp_path / "r.yaml"
    manifest.write_text("kind: PgRecovery\nmetadata: {name: shop-restore}\nspec: {dryRun: false}\n")
    StatusFile(tmp_path / "shop-restore.status.json").save({}, status)
    return manifest


def _ran(status: st.RecoveryStatus, phase: Phase, step: str, at: datetime) -> st.RecoveryStatus:
    status = st.enter_phase(status, phase, at)
    status = st.step_started(status, step, at)
    return st.step_finished(status, step, at + timedelta(seconds=2), message="done")


def _run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
         *argv: str) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["status", "-f", "r.yaml", *argv])
    return code, capsys.readouterr().out


def test_a_failed_run_in_words_and_as_documents(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    status = _ran(st.RecoveryStatus(), Phase.FETCHING, "select-backup", T0)
    status = _ran(status, Phase.RESTORING, "restore-dump", T0 + timedelta(seconds=10))
    status = st.set_facts(status, leftovers="pg/0: /var/vcap/store/postgresql-restore/x.dump")
    status = st.fail(status, "RestoreFailed", "psql exited 2", T0 + timedelta(seconds=20))
    _write(tmp_path, status)

    code, text = _run(capsys, monkeypatch, tmp_path)
    assert code == 1
    assert "FAILED (RestoreFailed): failed in Restoring: psql exited 2" in text
    lines = text.splitlines()
    # Each step under the phase it ran in, not the phase the recovery ended in.
    assert lines.index("phase Fetching:") < lines.index(
        next(x for x in lines if "select-backup" in x)) < lines.index("phase Restoring:")
    assert "left on the VMs (removed by `pgrecovery cleanup`): pg/0:" in text

    code, as_json = _run(capsys, monkeypatch, tmp_path, "-o", "json")
    assert code == 1
    document = json.loads(as_json)
    assert document["name"] == "shop-restore"
    assert document["status"]["failureReason"] == "RestoreFailed"
    assert [s["name"] for s in document["status"]["steps"]] == ["select-backup", "restore-dump"]
    code, as_yaml = _run(capsys, monkeypatch, tmp_path, "-o", "yaml")
    assert yaml.safe_load(as_yaml) == document


def test_exit_codes_succeeded_and_in_progress(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    running = _ran(st.RecoveryStatus(), Phase.STAGING, "stage-dump", T0)
    _write(tmp_path, running)
    assert _run(capsys, monkeypatch, tmp_path)[0] == 2
    done = st.set_facts(running, nextSteps="cf bind-service app db")
    done = st.succeed(done, "recovery complete", T0 + timedelta(seconds=5))
    _write(tmp_path, done)
    code, text = _run(capsys, monkeypatch, tmp_path)
    assert code == 0
    assert "next: cf bind-service app db" in text


def test_no_status_file_says_how_to_make_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "r.yaml").write_text("kind: PgRecovery\nmetadata: {name: x}\nspec: {a: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", "-f", "r.yaml"]) == 1
    assert "no status file at x.status.json: `pgrecovery recover -f r.yaml`" in \
        capsys.readouterr().err
