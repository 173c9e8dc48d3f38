"""`edgeft revise-manual BUNDLE NEW.txt`: put a revised manual into a bundle without retraining. Torch-free.

Answers cite (and, for a model tuned with retrieval, are grounded in) the bundle's manual, so a manual
revised after the model shipped goes into the bundle as it is: the model stays, the passages it is given
and cites come from the new text. The bundle is verified first exactly as `edgeft ask` verifies it (every
file's sha256, the signature, --trust keys); the new text must split into at least one passage under the
bundle's retrieval settings; the manual, bundle.json (which records each revision: new and previous
sha256, date) and SHA256SUMS are rewritten and the manifest's entries for them re-hashed with the
artifact routines, and a signed bundle is re-signed (--sign KEY), never left with a stale signature.

The revised bundle is built beside the original in a staging dir (model files hard-linked where the file
system allows, else copied, and hashed again there before anything is signed) and renamed into place, as
every artifact is: a crash leaves the old bundle or the new one, never a mix (between the two renames the old
one waits beside it as .tmp-NAME-old-PID, as in edgeft.artifact.build). Its manifest id changes
(the previous id and the manual's hash), so a later `edgeft export` to the same dir rebuilds the bundle
from its run instead of calling the revised one up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from edgeft import artifact
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_SUMS,
    MANIFEST_NAME,
    MANUAL_FILE,
    SIGNATURE_FILE,
    TMP_PREFIX,
)
from edgeft.device import signing
from edgeft.device.bundle import KEEP_BYTES, open_bundle, parse_spec
from edgeft.errors import UserError
from edgeft.records import manual_from_sections
from edgeft.runtime.retrieval import split_passages

STAGE = "revise-manual"  # what the new manifest id hashes in, after the previous id


def revise(bundle_dir: str | Path, new_manual: str | Path, key=None, trusted: list[bytes] | None = None) -> dict:
    """Replace the verified bundle's manual with `new_manual` (.txt), re-hashed and re-signed with `key`
    (an Ed25519 private key, required when the bundle is signed); returns the revision record
    ({} when the text is the one already bundled: nothing is written)."""
    path, new_manual = Path(bundle_dir).resolve(), Path(new_manual)  # resolved: `.` has a parent to stage in
    text, raw = _read_manual(new_manual)
    if (path / SIGNATURE_FILE).exists() and key is None:
        raise UserError(f"{path}: the bundle is signed; pass --sign KEY to re-sign it with the revised manual "
                        "(a stale signature is never left behind)")
    bundle = open_bundle(path, trusted=trusted)  # what ask checks: every file, the signature, the trusted keys
    try:
        spec, manifest = bundle.spec, bundle.manifest
        tuned = bundle.grounding_spec()
        rel = spec.get("manual") or MANUAL_FILE
        if not split_passages(text, rel, tuned.max_words if tuned else 0):
            raise UserError(f"{new_manual}: holds no manual passage (no non-blank line); pass the manual's text")
        new_sha = hashlib.sha256(raw).hexdigest()
        old = manifest["files"].get(rel) if spec.get("manual") else None
        if old is not None and old.get("sha256") == new_sha:
            return {}
        revision = {"sha256": new_sha, "previous_sha256": old["sha256"] if old else None,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": new_manual.name,
                    "signed_by": signing.private_key_id(key) if key is not None else None}
        kept = {r: b for r, b in bundle.blobs.items() if r != rel}  # verified bytes: SHA256SUMS, retrieval.json
    finally:
        bundle.close()
    spec = {**spec, "manual": rel, "manual_revisions": [*spec.get("manual_revisions", []), revision]}
    changed = {rel: raw, BUNDLE_FILE: (json.dumps(spec, indent=2) + "\n").encode()}
    new_id = artifact.artifact_id(manifest["id"], STAGE, {"manual_sha256": new_sha})
    _publish(path, manifest, changed, new_id, kept, key, trusted)
    return revision


def _read_manual(src: Path) -> tuple[str, bytes]:
    """The new manual's text and bytes: an existing UTF-8 .txt file the device can keep in memory, or a .json
    sections file (as data.manual takes it), converted to the same text the data stage writes."""
    if src.suffix.lower() not in (".txt", ".json"):
        raise UserError(f"{src}: a revised manual is a .txt file (one passage per line, sections at blank lines) "
                        "or a .json sections file as data.manual takes")
    try:
        if not src.is_file():
            raise UserError(f"{src}: file not found; pass the revised manual's .txt")
        if src.stat().st_size > KEEP_BYTES:
            raise UserError(f"{src}: over {KEEP_BYTES >> 20} MiB, more than a device keeps in memory; split the manual")
        raw = src.read_bytes()
    except OSError as e:
        raise UserError(f"{src}: cannot read it ({e.strerror}); pass the revised manual's .txt") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{src}: not valid UTF-8; re-encode the manual as UTF-8") from None
    if src.suffix.lower() == ".json":
        text = manual_from_sections(text, str(src))
        raw = text.encode("utf-8")
    return text, raw


def _publish(path: Path, manifest: dict, changed: dict[str, bytes], new_id: str, blobs: dict[str, bytes], key,
             trusted: list[bytes] | None) -> None:
    """Build the revised bundle in a staging dir beside `path` (unchanged files linked and re-verified, the
    `changed` ones written, SHA256SUMS and the manifest re-hashed, signed with `key`) and swap it in."""
    staging = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{STAGE}"
    old_dir = path.parent / f"{TMP_PREFIX}{path.name}-old-{os.getpid()}"
    for d in (staging, old_dir):
        if d.exists():
            shutil.rmtree(d)
    try:
        staging.mkdir()
        keep = {rel: meta for rel, meta in manifest["files"].items() if rel not in changed and rel != BUNDLE_SUMS}
        for rel in keep:
            _link(path / rel, staging / rel)
        # hashed again where they now are: what gets signed is what was verified
        artifact.verify_dir(staging, keep, what="bundle", fix="copy the bundle again from the build host")
        for rel, data in changed.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        if BUNDLE_SUMS in manifest["files"]:
            _write_sums(blobs[BUNDLE_SUMS].decode(), staging, changed)
        files = dict(manifest["files"])
        for rel in [*changed, *([BUNDLE_SUMS] if BUNDLE_SUMS in files else [])]:
            files[rel] = {"sha256": artifact.sha256_file(staging / rel), "size": (staging / rel).stat().st_size}
        new = {**manifest, "id": new_id, "files": files}
        if isinstance(new.get("metrics"), dict) and "size_bytes" in new["metrics"]:
            new["metrics"] = {**new["metrics"], "size_bytes": sum(f["size"] for f in files.values())}
        tmp = staging / (MANIFEST_NAME + ".part")
        tmp.write_text(json.dumps(new, indent=2) + "\n")
        os.replace(tmp, staging / MANIFEST_NAME)
        raw_manifest = (staging / MANIFEST_NAME).read_bytes()
        parse_spec(staging, changed[BUNDLE_FILE], new, {**blobs, **changed})  # the bundle.json a device reads
        if key is not None:
            signing.sign(staging, key)
            signing.check(staging, raw_manifest, trusted or [])
        os.replace(path, old_dir)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def _link(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no copy of a multi-GB model), a copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _write_sums(verified: str, staging: Path, changed: dict[str, bytes]) -> None:
    """The bundle's SHA256SUMS (what run.sh checks before Python; `verified`: its text as hashed) with the
    changed files' lines re-hashed."""
    lines, seen = [], set()
    for line in verified.splitlines():
        digest, _, rel = line.partition("  ")
        if rel in changed:
            digest = artifact.sha256_file(staging / rel)
            seen.add(rel)
        lines.append(f"{digest}  {rel}")
    lines += [f"{artifact.sha256_file(staging / rel)}  {rel}" for rel in sorted(changed) if rel not in seen]
    (staging / BUNDLE_SUMS).write_text("\n".join(lines) + "\n")
