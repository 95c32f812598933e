"""Object-store credentials from a Secret's keys or the environment: one parser, one set of
names (`backups.credentials`); errors name the keys and never a value."""

from __future__ import annotations

import pytest

from pgrecovery.backups.credentials import azure_credentials, s3_credentials
from pgrecovery.errors import SecretError

pytestmark = pytest.mark.unit


def test_s3_from_secret_bytes_and_from_text() -> None:
    creds = s3_credentials({"AWS_ACCESS_KEY_ID": b"AKIA\n", "AWS_SECRET_ACCESS_KEY": b"s3cr3t\n",
                            "AWS_SESSION_TOKEN": b"tok"}, "Secret ns/s3")
    assert creds.access_key_id == "AKIA"
    assert creds.secret_access_key.get_secret_value() == "s3cr3t"
    assert creds.session_token is not None
    assert s3_credentials({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "B"},
                          "env").session_token is None


def test_s3_missing_keys_are_named_without_values() -> None:
    with pytest.raises(SecretError) as err:
        s3_credentials({"AWS_ACCESS_KEY_ID": "visible-id", "AWS_SECRET_ACCESS_KEY": b"  \n"},
                       "Secret ns/s3")
    assert "Secret ns/s3 needs keys" in str(err.value)
    assert "missing AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert "visible-id" not in str(err.value)


def test_azure_names_and_their_order() -> None:
    cs = azure_credentials({"AZURE_STORAGE_CONNECTION_STRING": "cs",
                            "AZURE_STORAGE_KEY": "k"}, "env")
    assert cs.connection_string is not None
    assert cs.account_key is None
    for name in ("AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY"):
        key = azure_credentials({name: b"k\n", "AZURE_STORAGE_ACCOUNT": b"acct\n",
                                 "AZURE_STORAGE_SAS_TOKEN": b"sas"}, "Secret ns/az")
        assert key.account_key is not None
        assert key.account_key.get_secret_value() == "k"
        assert key.account_name == "acct"
        assert key.sas_token is None
    # The az CLI's name wins over the older one when both are there.
    both = azure_credentials({"AZURE_STORAGE_KEY": "new", "AZURE_STORAGE_ACCOUNT_KEY": "old"},
                             "env")
    assert both.account_key is not None
    assert both.account_key.get_secret_value() == "new"
    sas = azure_credentials({"AZURE_STORAGE_SAS_TOKEN": "sv=1"}, "env")
    assert sas.sas_token is not None
    assert sas.account_key is None


def test_azure_without_credentials_says_which_names() -> None:
    with pytest.raises(SecretError) as err:
        azure_credentials({"AZURE_STORAGE_ACCOUNT": "acct"}, "Secret ns/az")
    text = str(err.value)
    assert text.startswith("Secret ns/az needs AZURE_STORAGE_CONNECTION_STRING")
    assert "AZURE_STORAGE_KEY" in text
    assert "AZURE_STORAGE_SAS_TOKEN" in text
