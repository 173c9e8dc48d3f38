"""Ed25519 signatures over a bundle's manifest: whoever can edit a bundle cannot make a device trust it.

The manifest lists the sha256 of every file, so signing its exact bytes signs the whole bundle. The
signature sits beside it in `manifest.sig` (JSON: algorithm, signer's public key, signature). A device
that trusts keys (`--trust KEY.pub`, `$EDGEFT_TRUSTED_KEYS`, or ~/.config/edgeft/trusted_keys) refuses a
bundle that is unsigned or signed by any other key; without trusted keys a signature present must
still match the manifest (an edit after signing is refused), and an unsigned bundle runs as before.

    edgeft keygen keys/field-team        # writes keys/field-team.key (private, 0600) and .pub
    edgeft export --profile jetson --sign keys/field-team.key
    edgeft ask dist/jetson --trust keys/field-team.pub "What does E4 mean?"
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from edgeft.constants import SIGNATURE_FILE
from edgeft.errors import UserError

PUB_PREFIX = "edgeft-ed25519"
_DEFAULT_TRUST = Path("~/.config/edgeft/trusted_keys")


def keygen(stem: str | Path) -> tuple[Path, Path]:
    """Write a new key pair STEM.key (PEM, mode 0600) and STEM.pub (one line); refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stem = Path(stem)
    priv_path, pub_path = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise UserError(f"{p}: exists; keygen never overwrites a key: choose another name")
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pub_path.write_text(f"{PUB_PREFIX} {base64.b64encode(raw).decode()} {stem.name}\n")
    return priv_path, pub_path


def load_private(path: str | Path):
    """The Ed25519 private key in PEM file `path`; a wrong file is a one-line error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise UserError(f"--sign: cannot read {path} ({e.strerror}); pass the .key file `edgeft keygen` wrote") from None
    except (ValueError, TypeError):
        raise UserError(f"--sign: {path} is not an unencrypted PEM private key; pass the .key file "
                        "`edgeft keygen` wrote") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"--sign: {path} is not an Ed25519 key; make one with `edgeft keygen NAME`")
    return key


def sign(bundle_dir: Path, key) -> dict:
    """Sign `bundle_dir`'s manifest bytes with `key`; writes manifest.sig; returns its content."""
    from cryptography.hazmat.primitives import serialization

    from edgeft.constants import MANIFEST_NAME

    data = (bundle_dir / MANIFEST_NAME).read_bytes()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = {"algorithm": "ed25519", "public_key": base64.b64encode(raw).decode(),
           "key_id": key_id(raw), "signature": base64.b64encode(key.sign(data)).decode()}
    tmp = bundle_dir / (SIGNATURE_FILE + ".part")
    tmp.write_text(json.dumps(sig, indent=2) + "\n")
    os.replace(tmp, bundle_dir / SIGNATURE_FILE)
    return sig


def key_id(raw: bytes) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(raw).hexdigest()[:16]


def private_key_id(key) -> str:
    """The fingerprint of a private key's public half (what its signatures name)."""
    from cryptography.hazmat.primitives import serialization

    return key_id(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def trusted_keys(paths: list[str | Path] | None = None) -> list[bytes]:
    """Raw public keys from --trust files, $EDGEFT_TRUSTED_KEYS, else ~/.config/edgeft/trusted_keys."""
    sources = [Path(p) for p in paths or []]
    if not sources:
        env = os.environ.get("EDGEFT_TRUSTED_KEYS")
        default = _DEFAULT_TRUST.expanduser()
        sources = [Path(env)] if env else ([default] if default.is_file() else [])
    keys = []
    for src in sources:
        try:
            text = src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise UserError(f"--trust: cannot read {src} as text; pass the .pub file `edgeft keygen` wrote") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            keys.append(_parse_pub(line, f"{src}:{n}"))
        if not keys:
            raise UserError(f"--trust: {src} holds no public key; pass the .pub file `edgeft keygen` wrote")
    return keys


def check(bundle_dir: Path, manifest_bytes: bytes, trusted: list[bytes]) -> str | None:
    """Verify manifest.sig over `manifest_bytes`; returns the signer's key id, None when unsigned and untrusted.

    With `trusted` keys a bundle must be signed by one of them; any signature present must match."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    sig_path = bundle_dir / SIGNATURE_FILE
    if not sig_path.is_file() or sig_path.is_symlink():
        if trusted:
            raise UserError(f"{bundle_dir}: unsigned bundle, and this device trusts only signed ones; export it "
                            "with `edgeft export --sign KEY`")
        return None
    try:
        sig = json.loads(sig_path.read_bytes()[:65536])
        raw = base64.b64decode(sig["public_key"], validate=True)
        signature = base64.b64decode(sig["signature"], validate=True)
        if sig.get("algorithm") != "ed25519" or len(raw) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{sig_path}: not a valid edgeft signature file; copy the bundle again from the build "
                        "host") from None
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, manifest_bytes)
    except InvalidSignature:
        raise UserError(f"{sig_path}: the signature does not match the manifest (edited after signing); "
                        "refusing the bundle; copy it again from the build host") from None
    if trusted and raw not in trusted:
        raise UserError(f"{sig_path}: signed by key {key_id(raw)}, which this device does not trust; refusing "
                        "the bundle (add the builder's .pub with --trust if it is yours)")
    return key_id(raw)


def _parse_pub(line: str, where: str) -> bytes:
    parts = line.split()
    try:
        if parts[0] != PUB_PREFIX:
            raise ValueError
        raw = base64.b64decode(parts[1], validate=True)
        if len(raw) != 32:
            raise ValueError
    except (ValueError, IndexError):
        raise UserError(f"{where}: not an edgeft public key line ('{PUB_PREFIX} BASE64 [name]'); pass the .pub "
                        "file `edgeft keygen` wrote") from None
    return raw
