"""`cloudexit audit --sign KEY` and `cloudexit audit verify DIR --signer KEY.pub`: SHA256SUMS
signed with a real SSH key by the real ssh-keygen, so a forger who edits a file and recomputes
SHA256SUMS (which the unsigned audit cannot tell from the original) is caught."""

from __future__ import annotations

import hashlib
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_audit import migrated, run  # noqa: F401 - the module's migrated tiny PACS

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")


def keypair(folder: Path, name: str, comment: str, passphrase: str = "") -> Path:
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(key)],
                   check=True)
    return key


def key_fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], check=True, capture_output=True,
                          text=True).stdout.split()[1]


def resum(d: Path) -> None:
    """What a careful forger does after editing a file: a new SHA256SUMS."""
    lines = [f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}\n"
             for n in ("audit.html", "audit.json", "manifest.csv", "events.jsonl")]
    (d / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    return {"alice": keypair(folder, "alice", "alice@hospital"),
            "mallory": keypair(folder, "mallory", "mallory@elsewhere"),
            "locked": keypair(folder, "locked", "bob@hospital", passphrase="secret phrase")}


@pytest.fixture(scope="module")
def signed(migrated: dict[str, Any], keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("signed") / "audit"
    r = run("audit", "--db", migrated["db"], "--out", out, "--sign", keys["alice"])
    assert r.exit_code == 3, r.output  # written; the migration has exceptions to review
    assert "signed by alice@hospital" in r.output and f"--signer {keys['alice']}.pub" in r.output
    return out


def test_sign_then_verify(signed: Path, keys: dict[str, Path], migrated, tmp_path: Path) -> None:  # noqa: F811
    sig = signed / "SHA256SUMS.sig"
    assert sig.is_file() and stat.S_IMODE(sig.stat().st_mode) == 0o600
    fingerprint = key_fingerprint(Path(f"{keys['alice']}.pub"))
    html = (signed / "audit.html").read_text()
    assert f'data-signer-fingerprint="{fingerprint}"' in html and "alice@hospital" in html
    # ssh-keygen itself agrees the signature covers SHA256SUMS, under the cloudexit-audit namespace.
    with open(signed / "SHA256SUMS", "rb") as sums:
        check = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", "cloudexit-audit", "-s", str(sig)],
                               stdin=sums, capture_output=True, text=True)
    assert check.returncode == 0 and fingerprint in check.stdout

    r = run("audit", "verify", signed, "--signer", f"{keys['alice']}.pub")
    assert r.exit_code == 0, r.output
    assert f"OK: SHA256SUMS signed by alice@hospital (key {fingerprint})" in r.output
    allowed = tmp_path / "allowed_signers"
    alice_pub = Path(f"{keys['alice']}.pub").read_text()
    allowed.write_text(f'quality@hospital namespaces="cloudexit-audit" {alice_pub}')
    r = run("audit", "verify", signed, "--signer", allowed)
    assert r.exit_code == 0 and "signed by quality@hospital" in r.output, r.output
    r = run("audit", "verify", signed)
    assert r.exit_code == 0 and "signed, but the signature was not checked" in r.output, r.output

    # Unsigned: said plainly.
    r = run("audit", "verify", migrated["out"])
    assert r.exit_code == 0
    assert "not signed: only the fingerprint recorded on the paper sign-off proves integrity" in r.output
    # The Chinese report names the signer too.
    zh = tmp_path / "zh"
    assert run("audit", "--db", migrated["db"], "--out", zh, "--lang", "zh", "--sign", keys["alice"]).exit_code == 3
    assert "使用 SSH 密钥" in (zh / "audit.html").read_text() and fingerprint in (zh / "audit.html").read_text()


def test_forged_audit_fails_with_the_signature(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    html = (forged / "audit.html").read_text()
    (forged / "audit.html").write_text(html.replace('class="verdict ', 'class="verdict forged ', 1))
    resum(forged)
    # Without the signer the forgery passes every other check: the reason to sign.
    assert run("audit", "verify", forged).exit_code == 0
    r = run("audit", "verify", forged, "--signer", f"{keys['alice']}.pub")
    assert r.exit_code == 1, r.output
    assert "SHA256SUMS.sig: does not match SHA256SUMS" in r.output

    # The forger signs again, with a key of their own: not the hospital's signer.
    subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(keys["mallory"]), "-n", "cloudexit-audit",
                    str(forged / "SHA256SUMS")], check=True, capture_output=True, input=b"y\n")
    r = run("audit", "verify", forged, "--signer", f"{keys['alice']}.pub")
    assert r.exit_code == 1 and "SHA256SUMS.sig: not made by a key in" in r.output, r.output

    (forged / "SHA256SUMS.sig").unlink()
    r = run("audit", "verify", forged, "--signer", f"{keys['alice']}.pub")
    assert r.exit_code == 1 and "SHA256SUMS.sig: missing" in r.output, r.output


def test_wrong_signer_fails(signed: Path, keys: dict[str, Path]) -> None:
    r = run("audit", "verify", signed, "--signer", f"{keys['mallory']}.pub")
    assert r.exit_code == 1 and "SHA256SUMS.sig: not made by a key in" in r.output, r.output


def test_passphrase_key_and_missing_ssh_keygen_give_one_line(migrated, signed: Path, keys: dict[str, Path],  # noqa: F811
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "audit"
    r = run("audit", "--db", migrated["db"], "--out", out, "--sign", keys["locked"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert "protected by a passphrase" in lines[0] and "ssh-add" in r.output and "Traceback" not in r.output
    assert len(lines) <= 2 and not out.exists()  # nothing written

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = run("audit", "--db", migrated["db"], "--out", out, "--sign", keys["alice"])
    assert r.exit_code == 1 and "ssh-keygen is not installed" in r.output and "openssh-client" in r.output
    assert len(r.output.strip().splitlines()) <= 2 and not out.exists()
    r = run("audit", "verify", signed, "--signer", f"{keys['alice']}.pub")
    assert r.exit_code == 1 and "ssh-keygen is not installed" in r.output and "Traceback" not in r.output


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="ssh-agent is not installed")
def test_public_key_signs_through_ssh_agent(migrated, keys: dict[str, Path], tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The way to sign with a passphrase-protected key: load it into ssh-agent, pass KEY.pub."""
    pub = Path(f"{keys['alice']}.pub")
    out = tmp_path / "audit"
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    r = run("audit", "--db", migrated["db"], "--out", out, "--sign", pub)
    assert r.exit_code == 1 and "none is running" in r.output and not out.exists()

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        # Ready when it accepts a connection: the socket file appears at bind(), before the
        # agent listens, and an ssh-add in between is refused (exit 2, seen under load).
        deadline = time.monotonic() + 30
        while not _accepts(sock):
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", "-q", str(keys["alice"])], check=True, capture_output=True)
        r = run("audit", "--db", migrated["db"], "--out", out, "--sign", pub)
        assert r.exit_code == 3 and "signed by alice@hospital" in r.output, r.output
    finally:
        agent.terminate()
        agent.wait()
    r = run("audit", "verify", out, "--signer", pub)
    assert r.exit_code == 0 and "signed by alice@hospital" in r.output, r.output
