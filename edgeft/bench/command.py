"""`edgeft bench`: measure bundles / artifact dirs / model files on this machine, or gate finished reports.

Torch-free unless a torch model dir is passed. The measurement lands in a bench artifact (report
files + manifest, atomic); `--select` then prints the variant the profile's gate picks, or fails
with the closest miss.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from edgeft import artifact
from edgeft.bench import grounded, report, targets
from edgeft.bench.harness import GATE_KEYS, Config, run_bench
from edgeft.constants import KIND_BENCH, REPORT_MD
from edgeft.errors import UserError
from edgeft.profile import stage_config


def config_for(profile, samples: int | None = None, repeats: int | None = None,
               max_new_tokens: int | None = None) -> Config:
    """The harness config for the device profile this bench runs on, with the command line's counts."""
    cfg = stage_config("bench", Config(), profile, on_device=True)
    for key, v in (("max_samples", samples), ("repeats", repeats), ("max_new_tokens", max_new_tokens)):
        if v is not None:
            cfg = dataclasses.replace(cfg, **{key: v})
    return cfg


def load_profile(name: str | None, paths: list[Path], overrides: dict):
    """The named profile; without a name, the profile a bundle among `paths` was built for (else x86-cpu)."""
    from edgeft import profile
    from edgeft.config import from_dict
    from edgeft.constants import BUNDLE_FILE

    bundle = next((Path(p) for p in paths if (Path(p) / BUNDLE_FILE).is_file()), None)
    if name is not None or bundle is None:
        return profile.load(name or "x86-cpu", overrides)
    from edgeft.bench.targets import verified_bundle

    raw = {**verified_bundle(bundle).spec["profile"], **overrides}  # verified as `ask` verifies it
    prof = from_dict(profile.Profile, raw, str(bundle / BUNDLE_FILE))
    profile.validate(prof, str(bundle / BUNDLE_FILE))
    return prof


def run(paths: list[Path], profile, *, eval_path: Path | None, out: Path | None, heldout: Path | None = None,
        tokenizer: Path | None = None, cfg: Config | None = None) -> list[dict]:
    """Measure the variants in `paths` into the bench artifact `out`, or return the records of finished reports."""
    t = targets.discover(paths)
    if not t.variants:
        if not t.reports:
            raise UserError("bench: nothing to measure; pass a bundle, artifact dirs or model files")
        return [r for rep in t.reports for r in rep]
    if eval_path is None or out is None:
        raise UserError("bench: measuring variants needs --eval (a JSONL or a data artifact dir) and --out DIR")
    tok = Path(tokenizer) if tokenizer else t.tokenizer_dir
    if tok is None or not (tok / "tokenizer.json").is_file():
        raise UserError("bench: no tokenizer.json beside the variants; pass --tokenizer DIR (the tuned model "
                        "or export artifact dir)")
    records_in, text = targets.eval_set(eval_path, heldout)
    # grounded prompts are judged with the bundle's retriever (what `ask` runs), else the data artifact's
    retrieval = t.retrieval or (grounded.from_data_dir(eval_path) if Path(eval_path).is_dir() else None)
    cfg = cfg or config_for(profile)
    inputs = {"variants": {v.name: str(Path(v.path).resolve()) for v in t.variants},
              "eval_sha256": artifact.sha256_file(_eval_file(eval_path)), "heldout_chars": len(text),
              "tokenizer": str(tok.resolve())}
    if retrieval is not None:
        inputs["retrieval"] = {**retrieval.spec.to_dict(), "manual_sha256": _sha256(retrieval.manual)}

    def payload(tmp: Path) -> dict:
        recs = run_bench(t.variants, records_in, tok, cfg, tmp / "work", text, retrieval)
        for f in (tmp / "work").iterdir():
            f.unlink()
        (tmp / "work").rmdir()
        ref = t.variants[0]
        note = [f"reference for top1_agreement / kld: {ref.name} (the first variant given)"]
        note += grounded.missing_note(records_in, retrieval)
        report.write(recs, tmp, "", note)
        return {"variants": len(recs), "samples": cfg.max_samples, "reference": ref.name}

    # the budgets gate (`--select`), they do not change what is measured: a changed budget reuses the measurement
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in GATE_KEYS}
    art = artifact.build(out, kind=KIND_BENCH, stage="bench", params=params, parent=None, payload=payload,
                         inputs=inputs)
    print((art.path / REPORT_MD).read_text(), flush=True)
    return json.loads((art.path / "report.json").read_text()) + [r for rep in t.reports for r in rep
                                                                   if r.get("name") == "tuned"]


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _eval_file(p: Path) -> Path:
    from edgeft.constants import EVAL_FILE

    return p / EVAL_FILE if Path(p).is_dir() else Path(p)
