"""What a new user of the CLI reads: --version, a description per backups command, and help
that offers only the options a command has."""

from __future__ import annotations

import pytest

from pgrecovery.cli import build_parser, in_cli_words

pytestmark = pytest.mark.unit


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("pgrecovery ")


@pytest.mark.parametrize("command", ["list", "fetch", "decrypt"])
def test_every_backups_command_describes_itself(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = _help(capsys, "backups", command)
    _usage, _, rest = text.partition("\n\n")
    assert not rest.startswith("options"), text  # a description comes first
    assert rest.split("\n\n")[0].strip(), text


def test_list_does_not_offer_an_option_it_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--backup-id" not in _help(capsys, "backups", "list")
    assert "--backup-id" in _help(capsys, "backups", "decrypt")


def test_cli_messages_name_flags_not_manifest_fields() -> None:
    text = in_cli_words("check spec.source.encryption.keySecretRef; set spec.source.backupId "
                        "or spec.source.backupGuid")
    assert text == "check --key-file / --key-env; set --backup-id or --guid"
