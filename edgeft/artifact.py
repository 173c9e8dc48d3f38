"""The one contract between stages: an artifact directory and its manifest.

A stage builds its payload in a staging dir beside the destination, then this module hashes every
file, writes `manifest.json` last and renames the staging dir into place, so a crash never leaves
a directory that looks finished. The artifact id hashes (parent id, stage, params): it is both the
cache key and the lineage.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeft import rss
from edgeft.constants import KINDS, MANIFEST_NAME, MANIFEST_VERSION, TMP_PREFIX
from edgeft.errors import StageFailure, UserError

_VERSIONED = ("edgeft", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum",
              "onnx", "onnxruntime", "gguf", "llama_cpp", "tokenizers", "numpy")


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: its directory and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def metrics(self) -> dict:  # what the stage measured (sizes, losses, gates)
        return self.manifest.get("metrics") or {}

    @property
    def params(self) -> dict:  # the stage's exact config, as hashed into the id
        return self.manifest.get("params") or {}

    @property
    def inputs(self) -> dict:  # what else went into the id: data and base ids, file hashes
        return self.manifest.get("inputs") or {}

    @property
    def parent(self) -> dict:
        """The parent's {id, stage, path}, or {} for a root artifact."""
        return self.manifest.get("parent") or {}


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a directory as a dict, None when it has none; a corrupt one is a UserError. No hashing."""
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: corrupt manifest ({e}); delete {Path(path)} and rerun its stage") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: corrupt manifest (not a JSON object); delete {Path(path)} and rerun its stage")
    return manifest


def artifact_id(parent_id: str | None, stage: str, params: Any, inputs: dict | None = None) -> str:
    """Hash of (parent id, stage, params, input hashes): equal inputs give the same id, so the stage is skipped."""
    blob = json.dumps({"parent": parent_id, "stage": stage, "params": _jsonable(params),
                       "inputs": _jsonable(inputs or {})}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: list[Path]) -> str:
    """One sha256 over several files' contents, in the given order (data and tokenizer hashes)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def load(path: str | Path, kind: str | tuple[str, ...] | None = None, verify: bool = True) -> Artifact:
    """Open a finished artifact, optionally checking its kind and every file's hash."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise UserError(f"{path}: not a finished edgeft artifact (no {MANIFEST_NAME}); "
                        "rerun the stage that produces it")
    art = Artifact(path, read_manifest(path))
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and art.kind not in kinds:
        raise UserError(f"{path}: artifact kind is '{art.kind}', this stage needs {' or '.join(kinds)}; "
                        "pass the output of the right stage")
    if verify:
        verify_files(art)
    return art


_VERIFIED: dict[str, tuple] = {}  # artifact dir -> (id, stat signature) already hashed in this process


def verify_files(art: Artifact) -> None:
    """Recompute the sha256 of every file listed in the manifest; any change is an error."""
    listed = art.manifest.get("files", {})
    key = str(art.path.resolve())
    sig = (art.id, _stat_signature(art.path, listed))
    if _VERIFIED.get(key) == sig:
        return  # hashed earlier in this process and not touched since (size and mtime unchanged)
    verify_dir(art.path, listed, what="artifact", fix=f"rebuild the artifact (delete {art.path} and rerun)")
    _VERIFIED[key] = sig


def verify_dir(root: Path, files: dict, *, what: str, fix: str, exclusive: tuple[str, ...] | None = None,
               keep: Callable[[str], str | None] = lambda rel: None, keep_max: int = 64 << 20) -> dict:
    """The one check of a manifest's files, for artifacts and bundles alike: every entry inside `root`, present,
    of its size and sha256, each hashed through one descriptor. `exclusive`: also refuse symlinks and any file
    not listed (but those named). `keep(rel)` = 'bytes' keeps a small file's verified bytes, 'fd' its open
    descriptor (the caller closes it): what the device then uses, never the path reopened. Returns them by entry."""
    root = Path(root)
    mpath, real = root / MANIFEST_NAME, root.resolve()
    for rel in files:
        if not isinstance(rel, str) or Path(rel).is_absolute() or real not in (real / rel).resolve().parents:
            raise UserError(f"{mpath}: file entry '{str(rel)[:200]}' points outside the {what} (a hostile or "
                            f"hand-edited manifest); refusing it; {fix}")
    if exclusive is not None:
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_symlink():
                raise UserError(f"{f}: a symlink inside the {what}; it holds plain files only; {fix}")
            if f.is_file() and rel not in files and rel not in exclusive:
                raise UserError(f"{f}: not part of the {what} (unlisted in {MANIFEST_NAME}); remove it or {fix}")
    kept: dict = {}
    try:
        for rel, meta in files.items():
            got = _verify_file(root, rel, meta, keep(rel), keep_max, what, fix)
            if got is not None:
                kept[rel] = got
    except BaseException:
        for v in kept.values():
            if isinstance(v, int):
                os.close(v)
        raise
    return kept


def _verify_file(root: Path, rel: str, meta: dict, keep: str | None, keep_max: int, what: str, fix: str):
    f = root / rel
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise UserError(f"{f}: listed in {root / MANIFEST_NAME} but missing from the {what}; {fix}") from None
    try:
        size = os.fstat(fd).st_size
        changed = UserError(f"{f}: changed since its manifest was written (sha256 mismatch: it does not match the "
                            f"{what} manifest; tampered or corrupted); {fix}")
        if not isinstance(meta, dict) or size != meta.get("size"):
            raise changed
        h, chunks = hashlib.sha256(), []
        small = keep == "bytes" and size <= keep_max
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            if small:
                chunks.append(chunk)
        if h.hexdigest() != meta.get("sha256"):
            raise changed
    except BaseException:
        os.close(fd)
        raise
    if small:
        os.close(fd)
        return b"".join(chunks)
    if keep == "fd":
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    os.close(fd)
    return None


def _stat_signature(root: Path, listed: dict) -> tuple:
    out = []
    for rel in sorted(listed):
        try:
            st = (root / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((rel, None, None))
    return tuple(out)


def _check_replaceable(out: Path) -> None:
    """Refuse an output path that holds anything but an empty dir or a finished edgeft artifact.

    A directory is replaced only when its manifest.json is one edgeft wrote (manifest_version, a known
    kind, an id, a file list); any other directory that merely holds a file of that name is left alone."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output dir")
    mpath = out / MANIFEST_NAME
    if not mpath.exists():
        if any(out.iterdir()):
            raise UserError(f"{out}: exists and is not an edgeft artifact; choose another output dir or delete it")
        return
    try:
        m = json.loads(mpath.read_bytes()[: 64 << 20]) if mpath.is_file() and not mpath.is_symlink() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        m = None
    if not (isinstance(m, dict) and m.get("manifest_version") == MANIFEST_VERSION and m.get("kind") in KINDS
            and isinstance(m.get("id"), str) and isinstance(m.get("files"), dict)):
        raise UserError(f"{out}: holds a {MANIFEST_NAME} that is not an edgeft artifact's; refusing to replace "
                        "that directory: choose another output dir or delete it yourself")


def find_finished(out: Path, expected_id: str) -> Artifact | None:
    """The artifact at `out` if it is finished and has `expected_id`, else None."""
    mpath = out / MANIFEST_NAME
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return Artifact(out, manifest) if manifest.get("id") == expected_id else None


def build(out: str | Path, *, kind: str, stage: str, params: Any, parent: Artifact | None,
          payload: Callable[[Path], dict | None], inputs: dict | None = None) -> Artifact:
    """Run `payload(staging_dir) -> metrics` and publish the result at `out` atomically.

    `inputs` holds extra lineage (data and tokenizer hashes, base model name) and is part of the id.
    A finished artifact at `out` with the same id is returned as is (the stage is skipped); one
    with another id is replaced once the new one is complete; anything else at `out` is refused.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out = Path(out)
    params_d = _jsonable(params)
    aid = artifact_id(parent.id if parent else None, stage, params_d, inputs)
    if parent is not None:
        verify_files(parent)  # every stage checks its input's file hashes before using it
    found = find_finished(out, aid)
    if found is not None:
        verify_files(found)  # a finished artifact edited since is an error, never silently reused
        print(f"[skip] {stage}: {out} is up to date (id {aid})", flush=True)
        return found
    _check_replaceable(out)
    print(f"[run ] {stage} -> {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    t0, peak = time.time(), rss.Stage()
    try:
        metrics = payload(staging) or {}
        metrics = {"wall_s": round(time.time() - t0, 3), **peak.metrics(), **metrics}  # a stage's own win
        files = {str(p.relative_to(staging)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        metrics.setdefault("size_bytes", sum(f["size"] for f in files.values()))
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "id": aid,
            "kind": kind,
            "stage": stage,
            "params": params_d,
            "parent": ({"id": parent.id, "path": str(parent.path.resolve()), "stage": parent.stage,
                        "kind": parent.kind} if parent else None),
            "inputs": _jsonable(inputs or {}),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "metrics": _jsonable(metrics),
        }
        # the manifest is written last: its presence is what marks the artifact finished
        tmp_manifest = staging / (MANIFEST_NAME + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.replace(tmp_manifest, staging / MANIFEST_NAME)
        if out.exists():
            old = out.parent / f"{TMP_PREFIX}{out.name}-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(out.parent).free / 2**30
            raise StageFailure(f"{stage}: disk full while writing {out} ({free:.1f} GiB free now); "
                               "free space or choose another --out, then rerun (finished stages are kept)") from e
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Artifact(out, manifest)


def scratch_prefix(out: Path) -> str:
    """Prefix for a stage's scratch dir beside `out`: carries the pid, so a killed run's leftovers get cleaned."""
    return f"{TMP_PREFIX}{Path(out).name}-{os.getpid()}-scratch-"


def _remove_stale_staging(out: Path) -> None:
    """Delete staging and scratch dirs that a killed run left beside `out` (their process is gone)."""
    prefix = f"{TMP_PREFIX}{out.name}-"
    for d in out.parent.glob(f"{prefix}*"):
        pid = next((int(x) for x in d.name[len(prefix):].split("-") if x.isdigit()), None)
        if d.is_dir() and pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def lineage(path: str | Path) -> list[Artifact]:
    """The chain of artifacts from `path` back to the first one (data or base), newest first."""
    chain, seen = [], set()
    art: Artifact | None = load(path, verify=False)
    while art is not None and art.id not in seen:
        chain.append(art)
        seen.add(art.id)
        art = parent_of(art)
    return chain


def parent_of(art: Artifact) -> Artifact | None:
    """`art`'s recorded parent (unverified): at its recorded path, else beside `art` under the same name (a run
    dir that was moved or copied keeps its lineage); only an artifact with the recorded id counts."""
    parent = art.parent
    if not parent:
        return None
    for cand in (Path(parent["path"]), art.path.parent / Path(parent["path"]).name):
        if (cand / MANIFEST_NAME).is_file():
            found = load(cand, verify=False)
            if found.id == parent.get("id", found.id):
                return found
    return None


def library_versions() -> dict:
    """Versions of the libraries already imported in this process (no import is forced)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for mod in _VERSIONED:
        if mod == "edgeft" or mod in sys.modules:
            dist = {"llama_cpp": "llama-cpp-python"}.get(mod, mod)
            try:
                out[mod] = md.version(dist)
            except md.PackageNotFoundError:
                pass
    return out


def _jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and paths as plain JSON values (dict keys sorted on dump)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj
