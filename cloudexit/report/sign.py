"""Signing an audit with an SSH key, so SHA256SUMS cannot be recomputed by someone else.

SHA256SUMS proves the files agree with it, not who wrote it: anyone who edits a file can write
a new SHA256SUMS. `cloudexit audit --sign KEY` signs SHA256SUMS with `ssh-keygen -Y sign`
(namespace `cloudexit-audit`) into `SHA256SUMS.sig` beside it; `cloudexit audit verify DIR
--signer KEYFILE|allowed_signers` checks that signature with `ssh-keygen -Y verify`. The signer
(the key's comment, e.g. alice@hospital) and the key fingerprint are known before the report is
written, so audit.html shows them (for the paper sign-off) and is itself covered by the
signature, through SHA256SUMS.

KEY is a private key without a passphrase, or the public key (KEY.pub) of a key loaded in
ssh-agent (ssh-keygen then signs through the agent): cloudexit never asks for a passphrase.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cloudexit.core.errors import SigningError

NAMESPACE = "cloudexit-audit"
SIGNATURE = "SHA256SUMS.sig"
_KEY_TYPES = ("ssh-", "ecdsa-", "sk-")
_TIMEOUT = 60  # seconds for one ssh-keygen call (signing a 1 KB file: milliseconds)


@dataclass(frozen=True)
class Signer:
    """Who signs: the key given to --sign and what the report says about it."""

    key: str  # the path given to ssh-keygen -f (a private key, or a public key in ssh-agent)
    identity: str  # the public key's comment (user@host), else the login name
    key_type: str  # e.g. ssh-ed25519
    fingerprint: str  # SHA256:... as `ssh-keygen -l` prints it
    public_key: str  # "TYPE BASE64" (no comment)

    def facts(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("key")
        return {**out, "namespace": NAMESPACE, "file": SIGNATURE}


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if not found:
        raise SigningError("ssh-keygen is not installed: cannot sign or check an audit signature",
                           hint="install the SSH client (Debian/Ubuntu: apt-get install openssh-client)")
    return found


def _run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([_ssh_keygen(), *args], input=stdin, capture_output=True,
                              timeout=_TIMEOUT, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SigningError(f"ssh-keygen {args[0]} {args[1] if len(args) > 1 else ''} did not finish in "
                           f"{_TIMEOUT} s", hint="is it waiting for a passphrase or a security key touch?") from exc


def _last_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = (proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip().splitlines()
    return text[-1] if text else f"exit status {proc.returncode}"


def fingerprint(public_key: str) -> str:
    """`SHA256:...` of an OpenSSH public key line, as `ssh-keygen -l` computes it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _public_line(text: str) -> tuple[str, str] | None:
    """(TYPE BASE64, comment) of the first public key line in `text`, or None."""
    for line in text.splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) >= 2 and parts[0].startswith(_KEY_TYPES):
            try:
                base64.b64decode(parts[1], validate=True)
            except ValueError:
                continue
            return f"{parts[0]} {parts[1]}", parts[2].strip() if len(parts) > 2 else ""
    return None


def signer_of(key: str | os.PathLike[str]) -> Signer:
    """Read the key given to --sign; refuse one that would need a passphrase typed."""
    path = Path(key)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SigningError(f"--sign {key}: cannot read the key ({exc.strerror})",
                           hint="give the path of an SSH private key, e.g. ~/.ssh/id_ed25519") from exc
    public = _public_line(text)
    if public is None:  # a private key: its public half, without ever asking for a passphrase
        proc = _run(["-y", "-P", "", "-f", str(path)])
        if proc.returncode != 0:
            why = _last_line(proc)
            if "passphrase" in why:
                raise SigningError(
                    f"--sign {key}: the key is protected by a passphrase, which cloudexit does not ask for",
                    hint=f"load it into ssh-agent (ssh-add {key}) and pass its public key: --sign {key}.pub")
            raise SigningError(f"--sign {key}: not an SSH private key ({why})",
                               hint="create one with: ssh-keygen -t ed25519 -C you@hospital")
        public = _public_line(proc.stdout.decode("utf-8", "replace"))
        if public is None:
            raise SigningError(f"--sign {key}: ssh-keygen gave no public key for it")
        pub_file = Path(str(path) + ".pub")
        if not public[1] and pub_file.is_file():  # -y gives the comment of new-format keys only
            found = _public_line(pub_file.read_text(encoding="utf-8", errors="replace"))
            if found and found[0] == public[0]:
                public = found
    elif not os.environ.get("SSH_AUTH_SOCK"):
        raise SigningError(f"--sign {key}: a public key signs through ssh-agent, and none is running",
                           hint="start ssh-agent and ssh-add the private key, or pass the private key file")
    from cloudexit.report.facts import current_user

    line, comment = public
    return Signer(str(path), comment or current_user(), line.split()[0], fingerprint(line), line)


def sign(sums: Path, signer: Signer) -> Path:
    """Sign the file `sums` (SHA256SUMS); returns the signature file (`sums` + .sig)."""
    sig = Path(str(sums) + ".sig")
    sig.unlink(missing_ok=True)  # ssh-keygen asks before overwriting one
    proc = _run(["-Y", "sign", "-f", signer.key, "-n", NAMESPACE, str(sums)])
    if proc.returncode != 0 or not sig.is_file():
        why = _last_line(proc)
        hint = ("is the key loaded in ssh-agent (ssh-add -l)?" if signer.key.endswith(".pub")
                else "check the key with: ssh-keygen -y -f KEY")
        raise SigningError(f"signing SHA256SUMS with {signer.key} failed: {why}", hint=hint)
    os.chmod(sig, 0o600)
    return sig


def check(folder: Path, signer_file: str | os.PathLike[str] | None, shown: str | None) -> dict[str, Any]:
    """The signature of `folder`/SHA256SUMS: {"signed", "checked", "ok", "identity",
    "fingerprint", "problems", "note"}. `signer_file`: a public key or an allowed_signers file;
    `shown`: the key fingerprint audit.html names (it must be the key that signed)."""
    sums, sig = folder / "SHA256SUMS", folder / SIGNATURE
    out: dict[str, Any] = {"signed": sig.is_file(), "checked": False, "ok": None, "identity": None,
                           "fingerprint": None, "problems": [], "note": None}
    if signer_file is None:
        out["note"] = (
            "signed, but the signature was not checked: pass --signer KEYFILE or an allowed_signers file"
            if out["signed"] else
            "not signed: only the fingerprint recorded on the paper sign-off proves integrity "
            "(anyone who edits a file can recompute SHA256SUMS)")
        return out
    if not out["signed"]:
        out["ok"] = False
        out["problems"].append(f"{SIGNATURE}: missing (the audit was not signed, or its signature was removed)")
        return out
    if not sums.is_file():
        out["ok"] = False
        out["problems"].append(f"{SIGNATURE}: nothing to check it against (SHA256SUMS removed)")
        return out
    allowed = _allowed_signers(Path(signer_file))
    try:
        found = _run(["-Y", "find-principals", "-s", str(sig), "-f", str(allowed)])
        principals = found.stdout.decode("utf-8", "replace").split() if found.returncode == 0 else []
        if not principals:
            out["ok"] = False
            out["problems"].append(f"{SIGNATURE}: not made by a key in {signer_file} "
                                   "(another key signed it, or it was altered)")
            return out
        data = sums.read_bytes()
        for principal in principals:
            proc = _run(["-Y", "verify", "-f", str(allowed), "-I", principal, "-n", NAMESPACE, "-s", str(sig)],
                        stdin=data)
            if proc.returncode == 0:
                said = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
                out.update(checked=True, ok=True, identity=principal,
                           fingerprint=next((w for w in said.split() if w.startswith("SHA256:")), None))
                break
        else:
            out.update(checked=True, ok=False)
            out["problems"].append(f"{SIGNATURE}: does not match SHA256SUMS (SHA256SUMS was rewritten "
                                   "after signing, or the signature altered)")
    finally:
        if allowed != Path(signer_file):
            allowed.unlink(missing_ok=True)
    if out["ok"] and shown and out["fingerprint"] and shown != out["fingerprint"]:
        out["ok"] = False
        out["problems"].append(f"audit.html: names signing key {shown}, but {out['fingerprint']} signed")
    return out


def _allowed_signers(path: Path) -> Path:
    """An allowed_signers file for `path`: itself, or a temporary one made from a public key."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SigningError(f"--signer {path}: cannot read it ({exc.strerror})",
                           hint="give the signer's public key file (.pub) or an allowed_signers file") from exc
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    public = _public_line(text)
    if public is None or not lines[0][0].startswith(_KEY_TYPES):
        if not any(w.startswith(_KEY_TYPES) for words in lines for w in words[1:]):
            raise SigningError(f"--signer {path}: neither an SSH public key nor an allowed_signers file",
                               hint="give the signer's public key (e.g. id_ed25519.pub)")
        return path  # an allowed_signers file: principals, options, key
    principal = public[1].split()[0] if public[1] else "signer"
    fd, name = tempfile.mkstemp(prefix="cloudexit-signers-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f'{principal} namespaces="{NAMESPACE}" {public[0]}\n')
    return Path(name)
