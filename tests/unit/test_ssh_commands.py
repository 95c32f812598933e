"""Command building and error mapping of the SSH adapter, without a server.

The decisive check for quoting: the text we send is parsed by a real POSIX shell (`sh -c`
locally, exactly as sshd hands it to the login shell) back into the argv we meant, for
hostile inputs.
"""

from __future__ import annotations

import subprocess

import pytest

from pgrecovery.adapters.jobs import JobState, parse_poll_output, validate_job_id
from pgrecovery.adapters.ssh import (
    CommandResult,
    SshAuth,
    SshEndpoint,
    SshPool,
    _command_error,
    root_argv,
    root_command,
    root_shell,
    shell_join,
    shell_script_argv,
    validate_remote_path,
)
from pgrecovery.errors import (
    AuthenticationFailed,
    ConfigurationError,
    RemoteCommandFailed,
    SecretError,
)

pytestmark = pytest.mark.unit

HOSTILE = [
    "; rm -rf /",
    "$(reboot)",
    "`reboot`",
    "' ; echo pwned '",
    '" ; echo pwned "',
    "a\nb; echo pwned",
    "$HOME",
    "*",
    "~root",
    "-rf",
    "",
    "\t",
    "ünïcødé",
]


def _shell_parse(text: str) -> list[str]:
    """What a POSIX shell makes of `text` as a simple command: its argv."""
    out = subprocess.run(
        ["sh", "-c", f"set -f; printf '%s\\0' {text}"],
        capture_output=True,
        check=True,
    )
    return out.stdout.decode().split("\0")[:-1]


def test_shell_join_round_trips_hostile_values() -> None:
    assert _shell_parse(shell_join(HOSTILE)) == HOSTILE


def test_root_command_round_trips() -> None:
    text = root_command(["psql", "-d", "x; rm -rf /", "$(id)"], timeout=30)
    argv = _shell_parse(text)
    assert argv == ["sudo", "-n", "--", "timeout", "--kill-after=10", "30s",
                    "psql", "-d", "x; rm -rf /", "$(id)"]


def test_root_shell_passes_values_as_positional_arguments() -> None:
    script = 'printf "%s|" "$@"'
    argv = root_argv(shell_script_argv(script, *HOSTILE))
    assert argv[:6] == ["sudo", "-n", "--", "bash", "-c", script]
    # Run the bash part locally: the values come out unchanged and nothing else runs.
    out = subprocess.run(argv[3:], capture_output=True, check=True, text=True)
    assert out.stdout == "".join(f"{v}|" for v in HOSTILE)
    assert root_shell(script, "x").startswith("sudo -n -- bash -c ")


def test_nul_and_empty_commands_are_refused() -> None:
    with pytest.raises(ValueError):
        shell_join(["a\0b"])
    with pytest.raises(ValueError):
        root_command([])
    with pytest.raises(ValueError):
        root_command(["true"], timeout=0)


@pytest.mark.parametrize(
    "path",
    ["relative", "/a/../etc/shadow", "/a b", "/a;b", "/a$(x)", "//x", "/a\nb", ""],
)
def test_unsafe_remote_paths(path: str) -> None:
    with pytest.raises(ValueError):
        validate_remote_path(path)


def test_safe_remote_path() -> None:
    p = "/var/vcap/store/postgresql-restore/de2fe9e4-6535-423d-8709-dca87df7985c-1740130000000.dump"
    assert validate_remote_path(p) == p


def test_sudo_refusal_is_authentication_failure() -> None:
    node = SshEndpoint("pg/0", "10.0.0.1")
    err = _command_error(node, "sudo -n -- true",
                         CommandResult(1, "", "sudo: a password is required\n"))
    assert isinstance(err, AuthenticationFailed)
    err = _command_error(
        node, "sudo -n -- true",
        CommandResult(1, "", "bosh_x is not in the sudoers file.  This incident will be "
                             "reported.\n"))
    assert isinstance(err, AuthenticationFailed)
    err = _command_error(node, "x", CommandResult(1, "", "grep: sudo: a password\n"))
    assert isinstance(err, RemoteCommandFailed)


def test_non_zero_exit_keeps_status_and_first_stderr_lines() -> None:
    node = SshEndpoint("pg/0", "10.0.0.1")
    stderr = "\n".join(f"line {i}" for i in range(20))
    err = _command_error(node, "x", CommandResult(2, "", stderr))
    assert isinstance(err, RemoteCommandFailed)
    assert err.exit_status == 2
    assert err.stderr.splitlines() == [f"line {i}" for i in range(5)]
    assert "pg/0" in str(err)


def test_auth_material_is_checked_up_front() -> None:
    with pytest.raises(SecretError) as exc:
        SshPool(SshAuth("u", b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n", "x"))
    assert "not a key" not in str(exc.value)
    assert "private_key" not in repr(SshAuth("u", b"SECRET", "kh"))
    assert "SECRET" not in repr(SshAuth("u", b"SECRET", "kh"))


def test_known_hosts_required_unless_explicitly_insecure() -> None:
    key = subprocess.run(
        ["sh", "-c", "d=$(mktemp -d); ssh-keygen -q -t ed25519 -N '' -f $d/k; cat $d/k; rm -r $d"],
        capture_output=True, check=True,
    ).stdout
    with pytest.raises(ConfigurationError):
        SshPool(SshAuth("u", key, None))
    with pytest.raises(ConfigurationError):
        SshPool(SshAuth("u", key, "   \n"))
    SshPool(SshAuth("u", key, None, insecure_ignore_host_keys=True))


@pytest.mark.parametrize("job_id", ["a", "restore-1", "clone-pg-0-abc"])
def test_job_ids_valid(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "A", "a_b", "a/b", "../x", "a;b", "-a", "a b"])
def test_job_ids_invalid(job_id: str) -> None:
    with pytest.raises(ValueError):
        validate_job_id(job_id)


def test_job_poll_output_parsing() -> None:
    status = parse_poll_output("j", "state=finished\nexit=3\ncancelled=1\nsize=12\n---\ntail\n")
    assert status.state is JobState.FINISHED
    assert status.exit_code == 3
    assert status.cancelled
    assert status.log_size == 12
    assert status.log_tail == "tail\n"
    assert parse_poll_output("j", "state=absent\n").state is JobState.ABSENT
    with pytest.raises(RemoteCommandFailed):
        parse_poll_output("j", "sudo: something odd\n")
