"""Credentials, region and CA bundle when they are plainly given, without botocore.

botocore's default chain is the authority (`Source.session()`), but importing boto3 and
building its session costs ~0.2 s of CPU at every start of a command (docs/performance.md,
start-up). Most sites give static keys, in the environment or in ~/.aws/credentials: for
those `plain()` answers as botocore 1.44 would, reading the same files with the same parser
and the same precedence. Anything else (assume-role, SSO, web identity, `credential_process`,
keys only in ~/.aws/config, instance roles and containers, an unreadable or nested file, a
missing profile) returns None, and the caller asks botocore as before. `Source` is the only
caller: this is the one place that decides whether botocore is needed.

The precedence mirrored (botocore `credentials.create_credential_resolver`):
1. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (token: AWS_SECURITY_TOKEN, then
   AWS_SESSION_TOKEN), unless a profile was named explicitly (`--profile`, which the CLI also
   reads from AWS_PROFILE): then the environment's keys are not looked at;
2. the profile's `aws_access_key_id` / `aws_secret_access_key` in the shared credentials file,
   provided nothing that botocore tries first (role_arn, web identity, SSO, login) is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cloudexit.s3.client import Credentials

# Profile keys that make botocore get credentials some other way (or before the static keys).
OTHER_SOURCES = frozenset({"role_arn", "source_profile", "credential_source", "web_identity_token_file",
                           "credential_process", "login_session"})


@dataclass(frozen=True)
class Plain:
    credentials: Credentials
    region: str | None  # AWS_DEFAULT_REGION, else the profile's `region`
    ca_bundle: str | None  # AWS_CA_BUNDLE, else the profile's `ca_bundle`; None: the default


def plain(profile: str | None) -> Plain | None:
    """The settings botocore would resolve for `profile` (None: not named explicitly), or None
    when only botocore can tell."""
    env = os.environ
    name = profile
    if name is None:  # botocore's `profile` variable: AWS_DEFAULT_PROFILE, then AWS_PROFILE
        name = next((env[v] for v in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE") if v in env), None)
        if name == "":
            return None
    creds_file = _read(_path("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    config_file = _read(_path("AWS_CONFIG_FILE", "~/.aws/config"))
    if creds_file is None or config_file is None:
        return None  # not readable as botocore reads it: botocore says why
    profiles = _profiles(config_file)
    for section, values in creds_file.items():
        profiles.setdefault(section, {}).update(values)
    if name is not None and name not in profiles:
        return None  # botocore's ProfileNotFound, with its message
    scoped = profiles.get(name or "default", {})
    region = env["AWS_DEFAULT_REGION"] if "AWS_DEFAULT_REGION" in env else scoped.get("region")
    ca_bundle = env["AWS_CA_BUNDLE"] if "AWS_CA_BUNDLE" in env else scoped.get("ca_bundle")
    if any(isinstance(v, str) and v.startswith("\n") for v in (region, ca_bundle)):
        return None  # a nested value: botocore reads it as a section
    if profile is None and env.get("AWS_ACCESS_KEY_ID"):
        secret = env.get("AWS_SECRET_ACCESS_KEY")
        if not secret or env.get("AWS_CREDENTIAL_EXPIRATION"):
            return None  # partial (botocore's error) or expiring (botocore refreshes them)
        token = next((env[v] for v in ("AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN") if env.get(v)), None)
        return Plain(Credentials(env["AWS_ACCESS_KEY_ID"], secret, token), region, ca_bundle)
    if profile is None and ("AWS_WEB_IDENTITY_TOKEN_FILE" in env or "AWS_ROLE_ARN" in env):
        return None  # web identity from the environment comes before the profile's keys
    if any(k in OTHER_SOURCES or k.startswith("sso_") for k in scoped):
        return None
    keys = creds_file.get(name or "default", {})
    access, secret = keys.get("aws_access_key_id"), keys.get("aws_secret_access_key")
    if not access or not secret or access.startswith("\n") or secret.startswith("\n"):
        return None  # keys elsewhere (config file, process, instance role) or incomplete
    token = next((keys[k] for k in ("aws_security_token", "aws_session_token") if k in keys), None)
    return Plain(Credentials(access, secret, token), region, ca_bundle)


def default_ca_bundle() -> str:
    """The bundle botocore verifies with when none is configured (`httpsession.get_cert_path`):
    certifi's, else the one shipped in botocore; found without importing botocore."""
    try:
        from certifi import where
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("botocore")
        assert spec is not None and spec.origin is not None, "botocore is a dependency"
        return os.path.join(os.path.dirname(spec.origin), "cacert.pem")
    return where()


def _path(variable: str, default: str) -> str:
    path = os.environ.get(variable, default)
    return os.path.expanduser(os.path.expandvars(path))


def _read(path: str) -> dict[str, dict[str, str]] | None:
    """Sections of an INI file as botocore's `raw_config_parse` reads them ({} when there is no
    file); None when botocore would fail on it."""
    if not os.path.isfile(path):
        return {}
    import configparser  # here: ~3 ms of start-up where there is no file

    parser = configparser.RawConfigParser()
    try:
        parser.read([path])
    except (configparser.Error, UnicodeDecodeError):
        return None
    return {s: {k: parser.get(s, k) for k in parser.options(s)} for s in parser.sections()}


def _profiles(config: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The config file's profiles as botocore's `build_profile_map` names them: `[default]`,
    `[profile NAME]`."""
    profiles: dict[str, dict[str, str]] = {}
    for section, values in config.items():
        if section.startswith("profile"):
            import shlex

            try:
                parts = shlex.split(section)
            except ValueError:
                continue
            if len(parts) == 2:
                profiles[parts[1]] = dict(values)
        elif section == "default":
            profiles["default"] = dict(values)
    return profiles
