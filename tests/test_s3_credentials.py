"""Credentials, region and CA bundle resolved without botocore (`s3/credentials.py`) are exactly
what botocore's chain resolves, case by case; everything else is left to botocore."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cloudexit.core.config import SourceConfig
from cloudexit.core.errors import CredentialsError
from cloudexit.s3.client import Credentials
from cloudexit.s3.credentials import default_ca_bundle, plain
from cloudexit.s3.source import Source

ENV = {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"}
CREDS = "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n" \
        "[hospital]\naws_access_key_id = HOSPKEY\naws_secret_access_key = hospsecret\n" \
        "aws_session_token = hosptoken\n"
CONFIG = "[default]\nregion = eu-west-1\n[profile hospital]\nregion = cn-north-1\nca_bundle = /etc/hosp.pem\n"

# (name, env, credentials file, config file, --profile, what plain() answers: the access key, or
# None for "botocore decides")
CASES: list[tuple[str, dict[str, str], str | None, str | None, str | None, str | None]] = [
    ("env only, no files", ENV, None, None, None, "ENVKEY"),
    ("env over the default profile", ENV, CREDS, CONFIG, None, "ENVKEY"),
    ("env over AWS_PROFILE when no profile is named", {**ENV, "AWS_PROFILE": "hospital"}, CREDS, CONFIG,
     None, "ENVKEY"),
    ("a named profile over env (--profile, or AWS_PROFILE read by the CLI)", ENV, CREDS, CONFIG,
     "hospital", "HOSPKEY"),
    ("the default profile", {}, CREDS, CONFIG, None, "FILEKEY"),
    ("AWS_PROFILE in the environment", {"AWS_PROFILE": "hospital"}, CREDS, CONFIG, None, "HOSPKEY"),
    ("AWS_DEFAULT_PROFILE before AWS_PROFILE", {"AWS_DEFAULT_PROFILE": "default", "AWS_PROFILE": "hospital"},
     CREDS, CONFIG, None, "FILEKEY"),
    ("session token: AWS_SECURITY_TOKEN first", {**ENV, "AWS_SECURITY_TOKEN": "a", "AWS_SESSION_TOKEN": "b"},
     None, None, None, "ENVKEY"),
    ("AWS_DEFAULT_REGION over the profile's region", {**ENV, "AWS_DEFAULT_REGION": "ap-east-1"}, CREDS,
     CONFIG, None, "ENVKEY"),
    ("region in the credentials file overrides the config file's",
     {}, CREDS.replace("[hospital]\n", "[hospital]\nregion = us-west-2\n"), CONFIG, "hospital", "HOSPKEY"),
    ("[profile default] in the config file", {}, CREDS, "[profile default]\nregion = sa-east-1\n", None,
     "FILEKEY"),
    ("a quoted profile name", {}, CREDS.replace("[hospital]", "[my hospital]"),
     '[profile "my hospital"]\nregion = eu-north-1\n', "my hospital", "HOSPKEY"),
    ("AWS_CA_BUNDLE over the profile's", {"AWS_CA_BUNDLE": "/etc/env.pem"}, CREDS, CONFIG, "hospital",
     "HOSPKEY"),
    # botocore decides:
    ("no credentials anywhere", {}, None, None, None, None),
    ("a named profile that does not exist", ENV, CREDS, CONFIG, "nowhere", None),
    ("AWS_PROFILE names a profile that does not exist", {**ENV, "AWS_PROFILE": "nowhere"}, CREDS, CONFIG,
     None, None),
    ("an access key without a secret", {"AWS_ACCESS_KEY_ID": "ENVKEY"}, CREDS, None, None, None),
    ("expiring environment credentials", {**ENV, "AWS_CREDENTIAL_EXPIRATION": "2099-01-01T00:00:00Z"},
     None, None, None, None),
    ("assume-role profile", {}, CREDS, "[profile hospital]\nrole_arn = arn:aws:iam::1:role/r\n"
     "source_profile = default\n", "hospital", None),
    ("credential_process", {}, None, "[default]\ncredential_process = /bin/creds\n", None, None),
    ("SSO", {}, None, "[default]\nsso_session = s\nsso_account_id = 1\nsso_role_name = r\n", None, None),
    ("keys in the config file only", {}, None, "[default]\naws_access_key_id = CFGKEY\n"
     "aws_secret_access_key = cfgsecret\n", None, None),
    ("web identity from the environment", {"AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "arn:r"},
     CREDS, None, None, None),
    ("an unreadable credentials file", {}, "[default\naws_access_key_id = X\n", None, None, None),
]


@pytest.fixture
def aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A clean AWS environment (no IMDS, no containers) with the given files and variables."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def setup(env: dict[str, str], creds: str | None, config: str | None) -> None:
        for name, text, variable in (("credentials", creds, "AWS_SHARED_CREDENTIALS_FILE"),
                                     ("config", config, "AWS_CONFIG_FILE")):
            path = tmp_path / name
            if text is not None:
                path.write_text(text)
            monkeypatch.setenv(variable, str(path))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return setup


def _botocore(profile: str | None) -> tuple[Credentials | None, str | None, str | None]:
    """What boto3's session resolves, as `Source.session()` makes it."""
    import boto3

    session = boto3.Session(profile_name=profile)
    found = session.get_credentials()
    creds = None
    if found is not None:
        frozen = found.get_frozen_credentials()
        creds = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
    return creds, session.region_name, session._session.get_config_variable("ca_bundle")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plain_settings_are_botocores(aws: Any, case: tuple[Any, ...]) -> None:
    _name, env, creds, config, profile, expected = case
    aws(env, creds, config)
    found = plain(profile)
    if expected is None:
        assert found is None
        return
    assert found is not None and found.credentials.access_key == expected
    assert (found.credentials, found.region, found.ca_bundle) == _botocore(profile)


def test_source_falls_back_to_botocore_as_before(aws: Any) -> None:
    """Where plain() does not answer, Source asks botocore: a missing profile is the same one
    line, and an assume-role or config-file profile gets botocore's credentials."""
    aws(ENV, CREDS, CONFIG)
    with pytest.raises(CredentialsError, match="AWS profile not found: nowhere"):
        Source("s3://b", SourceConfig(profile="nowhere")).frozen_credentials()
    aws({}, None, "[profile x]\naws_access_key_id = CFGKEY\naws_secret_access_key = cfgsecret\n")
    source = Source("s3://b", SourceConfig(profile="x"))
    assert source.frozen_credentials() == Credentials("CFGKEY", "cfgsecret")
    assert source._session is not None  # botocore was asked


def test_plain_https_endpoint_needs_no_session_and_trusts_botocores_bundle(aws: Any) -> None:
    """TLS stays as it was: the lean endpoint verifies with the bundle botocore would use
    (configured, else certifi's), and with static keys no boto3 session is made for it."""
    from botocore.httpsession import get_cert_path

    assert default_ca_bundle() == get_cert_path(True)
    aws(ENV, CREDS, CONFIG)
    for profile, bundle in ((None, get_cert_path(True)), ("hospital", "/etc/hosp.pem")):
        source = Source("s3://b", SourceConfig(endpoint_url="https://s3.example.org", profile=profile))
        endpoint, creds = source.lean_endpoint()
        assert endpoint.verify == bundle
        assert endpoint.region == ("cn-north-1" if profile else "eu-west-1")
        assert creds.access_key == ("HOSPKEY" if profile else "ENVKEY")
        assert source._session is None


@pytest.mark.parametrize("which", ["credentials", "config"])
def test_a_settings_file_that_is_no_ini_file_is_one_line(aws: Any, tmp_path: Path, which: str) -> None:
    """plain() leaves a malformed file to botocore, which refuses it: the user gets one line
    naming the file (with and without a given endpoint), not botocore's traceback."""
    bad = "[default\naws_access_key_id = X\n"
    aws(ENV, bad if which == "credentials" else CREDS, bad if which == "config" else CONFIG)
    assert plain(None) is None
    for endpoint in ("https://s3.example.org", None):
        source = Source("s3://b", SourceConfig(endpoint_url=endpoint))
        with pytest.raises(CredentialsError, match=f"Unable to parse config file: .*{which}") as err:
            source.lean_endpoint()
        assert err.value.hint and "INI" in str(err.value)
