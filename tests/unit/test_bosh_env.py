"""Local mode from the bosh CLI's variables (adapters/bosh_env.py): which spec they make and
which secrets they answer, without a director."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pgrecovery.adapters.bosh_env import (
    BOSH_ENV_SECRET,
    BoshEnvSecrets,
    apply_bosh_environment,
    director_url,
)
from pgrecovery.engine.spec import parse_spec
from pgrecovery.errors import ConfigurationError, SecretError
from tests.unit.test_crd import _sample

pytestmark = pytest.mark.unit

ENV = {
    "BOSH_ENVIRONMENT": "10.0.0.6",
    "BOSH_CLIENT": "pgrecovery",
    "BOSH_CLIENT_SECRET": "s3cret",
    "BOSH_CA_CERT": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
    "BOSH_DEPLOYMENT": "a9s-pg",
}


def _spec_without_target_access() -> dict:  # type: ignore[type-arg]
    spec = _sample()["spec"]
    spec["target"].pop("nodes")
    spec["target"].pop("ssh")
    spec["target"].pop("deployment")
    return spec  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("10.0.0.6", "https://10.0.0.6:25555"),
        ("10.0.0.6:25555", "https://10.0.0.6:25555"),
        ("https://director.example:443/", "https://director.example:443"),
    ],
)
def test_director_url(value: str, url: str) -> None:
    assert director_url(value) == url


def test_unknown_alias_and_http_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="alias"):
        director_url("my-env")
    with pytest.raises(ConfigurationError, match="https"):
        director_url("http://10.0.0.6:25555")


def test_environment_makes_a_valid_bosh_target() -> None:
    spec = parse_spec(apply_bosh_environment(_spec_without_target_access(), ENV))
    assert spec.target.deployment == "a9s-pg"
    assert spec.target.bosh is not None
    assert spec.target.bosh.director == "https://10.0.0.6:25555"
    assert spec.target.bosh.gateway is None


def test_a_file_that_says_how_is_left_alone() -> None:
    spec = _sample()["spec"]
    assert apply_bosh_environment(spec, ENV) is spec


def test_all_proxy_becomes_the_gateway() -> None:
    env = {**ENV, "BOSH_ALL_PROXY": "ssh+socks5://jumpbox@10.0.0.5:2222?private-key=/k"}
    spec = parse_spec(apply_bosh_environment(_spec_without_target_access(), env))
    assert spec.target.bosh is not None
    gw = spec.target.bosh.gateway
    assert gw is not None
    assert (gw.host, gw.port, gw.user) == ("10.0.0.5", 2222, "jumpbox")
    with pytest.raises(ConfigurationError, match="ssh\\+socks5"):
        apply_bosh_environment(
            _spec_without_target_access(), {**ENV, "BOSH_ALL_PROXY": "socks5://10.0.0.5:1080"}
        )


async def test_secrets_come_from_the_variables(tmp_path: Path) -> None:
    key = tmp_path / "gw"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    known = tmp_path / "known"
    known.write_text("10.0.0.5 ssh-ed25519 AAAA\n")
    env = {
        **ENV,
        "BOSH_GW_HOST": "10.0.0.5",
        "BOSH_GW_PRIVATE_KEY": str(key),
        "BOSH_GW_KNOWN_HOSTS": str(known),
    }
    secrets = BoshEnvSecrets(SimpleNamespace(), env)
    ref = SimpleNamespace(name=BOSH_ENV_SECRET, key="ca")
    assert (await secrets.get_key(ref)).startswith(b"-----BEGIN CERTIFICATE")  # type: ignore[arg-type]
    assert await secrets.get_all(SimpleNamespace(name=BOSH_ENV_SECRET)) == {  # type: ignore[arg-type]
        "client": b"pgrecovery",
        "clientSecret": b"s3cret",
    }
    gw_key = SimpleNamespace(name=BOSH_ENV_SECRET, key="gw-private-key")
    assert await secrets.get_key(gw_key) == key.read_bytes()  # type: ignore[arg-type]
    gw_known = SimpleNamespace(name=BOSH_ENV_SECRET, key="gw-known-hosts")
    assert await secrets.get_key(gw_known) == known.read_bytes()  # type: ignore[arg-type]
    missing = BoshEnvSecrets(SimpleNamespace(), {})
    with pytest.raises(SecretError, match="BOSH_CLIENT"):
        await missing.get_all(SimpleNamespace(name=BOSH_ENV_SECRET))  # type: ignore[arg-type]


CA_PEM = "-----BEGIN CERTIFICATE-----\nFROMCONFIG\n-----END CERTIFICATE-----\n"


def _bosh_config(tmp_path: Path, **extra: str) -> Path:
    """A config as `bosh alias-env prod -e https://10.0.0.6:25555 --ca-cert ca.pem` writes it
    (`cmd/config/fs_config.go`), plus `extra` fields of the entry."""
    import yaml  # noqa: PLC0415

    path = tmp_path / "config"
    entry = {"url": "https://10.0.0.6:25555", "ca_cert": CA_PEM, "alias": "prod", **extra}
    path.write_text(yaml.safe_dump({"environments": [
        {"url": "https://10.9.9.9:25555", "alias": "other"}, entry]}))
    return path


async def test_an_alias_of_the_bosh_config_gives_url_ca_and_stored_client(
    tmp_path: Path,
) -> None:
    config = _bosh_config(tmp_path, username="stored-client", password="stored-secret")
    env = {"BOSH_ENVIRONMENT": "prod", "BOSH_CONFIG": str(config), "BOSH_DEPLOYMENT": "a9s-pg"}
    spec = parse_spec(apply_bosh_environment(_spec_without_target_access(), env))
    assert spec.target.bosh is not None
    assert spec.target.bosh.director == "https://10.0.0.6:25555"
    secrets = BoshEnvSecrets(inner=None, environ=env)
    ca = await secrets.get_key(SimpleNamespace(name=BOSH_ENV_SECRET, key="ca"))  # type: ignore[arg-type]
    assert ca.decode() == CA_PEM
    creds = await secrets.get_all(SimpleNamespace(name=BOSH_ENV_SECRET))  # type: ignore[arg-type]
    assert creds == {"client": b"stored-client", "clientSecret": b"stored-secret"}
    # The variables win over the file, as for bosh.
    over = BoshEnvSecrets(inner=None,
                          environ={**env, "BOSH_CLIENT": "c", "BOSH_CLIENT_SECRET": "s"})
    assert await over.get_all(SimpleNamespace(name=BOSH_ENV_SECRET)) == {  # type: ignore[arg-type]
        "client": b"c", "clientSecret": b"s"}


async def test_a_bosh_log_in_user_session_is_not_used_and_the_error_says_what_to_set(
    tmp_path: Path,
) -> None:
    config = _bosh_config(tmp_path, access_token="eyJ.a.b", refresh_token="eyJ.r.t")
    env = {"BOSH_ENVIRONMENT": "prod", "BOSH_CONFIG": str(config)}
    secrets = BoshEnvSecrets(inner=None, environ=env)
    with pytest.raises(SecretError, match=r"BOSH_CLIENT is not set.*user session") as caught:
        await secrets.get_all(SimpleNamespace(name=BOSH_ENV_SECRET))  # type: ignore[arg-type]
    assert "eyJ" not in str(caught.value)


def test_an_unreadable_bosh_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("environments: [unclosed")
    with pytest.raises(ConfigurationError, match="not YAML"):
        director_url("prod", {"BOSH_CONFIG": str(bad)})
