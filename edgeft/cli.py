"""Command line: edgeft run | show | bench | export | ask | revise-manual | doctor | keygen.

Errors end in one line on stderr naming what to fix, exit code 2 for bad input and 1 for a failed
run; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from edgeft.errors import EdgeftError, UserError

EXAMPLES = """examples:
  edgeft run --recipe recipes/demo.yaml --profile x86-cpu --out runs/demo
  edgeft run --recipe recipes/demo.yaml --profile jetson --out runs/j data.train=my.jsonl base.model=org/model
  edgeft show runs/demo/bench
  edgeft bench runs/demo/merge runs/demo/gguf --eval runs/demo/data --out runs/demo/bench-here --select
  edgeft export --profile jetson --from runs/demo      # writes dist/jetson
  edgeft ask dist/jetson "What does fault code E964 mean?"
  edgeft revise-manual dist/jetson manual-rev2.txt --sign keys/field-team.key
  edgeft doctor dist/jetson
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgeft` command."""
    parser = argparse.ArgumentParser(prog="edgeft", description="fine-tune, compress, export and bench small LLMs",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the whole chain of a recipe for a device profile")
    p_run.add_argument("--recipe", type=Path, help="recipe YAML (base model, data, stage params); required")
    p_run.add_argument("--profile", default="x86-cpu", help="device profile name (profiles/) or YAML path")
    p_run.add_argument("--out", type=Path, help="run directory (one artifact dir per stage); required")
    p_run.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                       help="print every key of a recipe section (train, export_gguf, bench, base, ...) or of "
                            "profile, with its type, default and meaning, and exit; no SECTION lists the sections")
    p_run.add_argument("overrides", nargs="*", metavar="key=value",
                       help="typed overrides: section.key=value (base.model=, data.train=, train.method=, "
                            "profile.threads=, ...)")
    p_show = sub.add_parser("show", help="print an artifact's lineage back to the data")
    p_show.add_argument("dir", type=Path)
    p_bench = sub.add_parser("bench", help="measure variants (bundle, artifact dirs, .gguf, ONNX dirs) on this machine; "
                                           "--select gates them")
    p_bench.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="bundle, gguf/onnx/hf artifact dir, .gguf file, ONNX model dir, or a bench dir "
                              "(reuses its report); the first measured variant is the agreement reference")
    p_bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="profile.key=value",
                         help="profile override (repeatable), e.g. --set profile.threads=4")
    p_bench.add_argument("--eval", dest="eval_path", type=Path, help="eval JSONL or the run's data artifact dir")
    p_bench.add_argument("--heldout", type=Path, help="held-out manual text (.txt) for perplexity")
    p_bench.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (default: found beside the variants)")
    p_bench.add_argument("--profile", help="device profile name (profiles/) or YAML path (default: the bundle's, "
                                           "else x86-cpu)")
    p_bench.add_argument("--out", type=Path, help="bench artifact dir for the report")
    p_bench.add_argument("--samples", type=int, help="eval prompts measured (default: the profile's bench_samples)")
    p_bench.add_argument("--repeats", type=int, help="timed runs per latency figure (default 5)")
    p_bench.add_argument("--select", action="store_true",
                         help="print the smallest variant within the profile's budgets; exit 2 naming the closest miss")
    p_bench.add_argument("--reference-score", type=float,
                         help="the tuned model's rouge_l when no 'tuned' record is at hand (device side)")
    p_exp = sub.add_parser("export", help="build, bench and select a profile's variants into a deployable bundle")
    p_exp.add_argument("--profile", required=True, help="device profile name (profiles/) or YAML path")
    p_exp.add_argument("--from", dest="src", type=Path, default=Path("runs/demo"),
                       help="run dir or tuned hf artifact dir (default: runs/demo)")
    p_exp.add_argument("--data", type=Path, help="data artifact with the eval split and manual (default: RUN/data)")
    p_exp.add_argument("--out", type=Path, help="bundle dir (default: dist/PROFILE)")
    p_exp.add_argument("--sign", type=Path, metavar="KEY",
                       help="sign the bundle's manifest with this Ed25519 private key (from `edgeft keygen`)")
    p_exp.add_argument("overrides", nargs="*", metavar="key=value",
                       help="profile.KEY=, export_gguf.KEY= or export_onnx.KEY= overrides")
    p_key = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: NAME.key and NAME.pub")
    p_key.add_argument("name", type=Path, help="path stem of the two files, e.g. keys/field-team")
    p_ask = sub.add_parser("ask", help="answer a question with a bundle (verifies its checksums first)")
    p_ask.add_argument("bundle", type=Path, help="the dist/PROFILE dir")
    p_ask.add_argument("question", nargs="*", help="the question; none = interactive, one per line")
    p_ask.add_argument("--retrieval", choices=("grounded", "prompt", "cite", "off"),
                       help="grounded (default for a model tuned with retrieval): answer from the manual passages "
                            "the model was tuned to read, check the passage it cites, abstain when the manual does "
                            "not cover it; cite (default otherwise): the best passage beside the model's answer; "
                            "prompt: that passage also in the prompt; off: the model alone")
    p_ask.add_argument("--max-new-tokens", type=int, help="answer length cap in tokens (default: the bundle's)")
    p_ask.add_argument("--threads", type=int, help="CPU threads (default: the profile's)")
    p_ask.add_argument("--trust", type=Path, action="append", metavar="PUBKEY",
                       help="accept only bundles signed by this key (repeatable; default: $EDGEFT_TRUSTED_KEYS "
                            "or ~/.config/edgeft/trusted_keys when present)")
    p_rev = sub.add_parser("revise-manual", help="replace a bundle's manual with a revised text (no retraining): "
                                                 "verified, re-hashed, re-signed")
    p_rev.add_argument("bundle", type=Path, help="the dist/PROFILE dir")
    p_rev.add_argument("manual", type=Path, help="the revised manual (.txt: sections at blank lines, heading first)")
    p_rev.add_argument("--sign", type=Path, metavar="KEY",
                       help="re-sign the bundle with this Ed25519 private key (required when it is signed)")
    p_rev.add_argument("--trust", type=Path, action="append", metavar="PUBKEY",
                       help="accept only a bundle signed by this key (repeatable; as for ask)")
    p_doc = sub.add_parser("doctor", help="runtimes, GPU, memory, and a smoke bench of a bundle")
    p_doc.add_argument("bundle", type=Path, nargs="?", help="a bundle dir to verify and time")
    p_doc.add_argument("--seconds", type=float, default=10.0, help="smoke bench duration (default 10)")
    p_doc.add_argument("--threads", type=int, help="CPU threads for the smoke bench (default: the profile's)")
    p_doc.add_argument("--trust", type=Path, action="append", metavar="PUBKEY",
                       help="accept only bundles signed by this key (as for ask)")
    args = parser.parse_args(argv)
    if args.cmd == "run" and args.help_config is None and (args.recipe is None or args.out is None):
        p_run.error("the following arguments are required: "
                    + ", ".join(a for a, v in (("--recipe", args.recipe), ("--out", args.out)) if v is None))
    if not args.debug:
        _quiet()
    try:
        if args.cmd == "run":
            return _cmd_run(args)
        if args.cmd == "bench":
            return _cmd_bench(args)
        if args.cmd in ("export", "ask", "revise-manual", "doctor", "keygen"):
            return {"export": _cmd_export, "ask": _cmd_ask, "revise-manual": _cmd_revise_manual,
                    "doctor": _cmd_doctor, "keygen": _cmd_keygen}[args.cmd](args)
        return _cmd_show(args)
    except EdgeftError as e:
        if args.debug:
            raise
        print(f"edgeft: error: {e}", file=sys.stderr)
        return e.exit_code
    except (MemoryError, OSError, RuntimeError, ValueError) as e:
        if args.debug:
            raise
        print(f"edgeft: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeft: interrupted; finished stages are kept and will be skipped on the next run", file=sys.stderr)
        return 130


def _cmd_run(args) -> int:
    from edgeft import pipeline, profile
    from edgeft.config import parse_overrides

    if args.help_config is not None:
        return _cmd_help_config(args.help_config)
    if not args.recipe.is_file():
        raise UserError(f"--recipe: file not found: {args.recipe}")
    overrides = parse_overrides(args.overrides)
    prof_over = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("profile.")}
    rec_over = {k: v for k, v in overrides.items() if not k.startswith("profile.")}
    prof = profile.load(args.profile, prof_over)
    recipe = pipeline.load_recipe(args.recipe, rec_over)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    arts = pipeline.run(recipe, prof, args.out)
    if "bench" not in arts:  # another rank under `accelerate launch`: rank 0 exports, benches and reports
        return 0
    print("\n" + (arts["bench"].path / "report.md").read_text(), flush=True)
    print(_stage_table(arts, started), flush=True)
    print(f"done: {len(arts)} artifacts in {args.out}; report: {arts['bench'].path / 'report.md'}")
    return 0


def _stage_table(arts: dict, started: str) -> str:
    """Each stage's wall time and peak memory, from its manifest; stages skipped in this run say so."""
    rows = ["| stage | wall s | peak RSS MiB | children peak RSS MiB | |", "|---|---|---|---|---|"]
    for name, art in arts.items():
        m, when = art.metrics, art.manifest.get("created", "")
        rows.append(f"| {name} | {m.get('wall_s', '-')} | {m.get('peak_rss_mb', '-')} | "
                    f"{m.get('children_peak_rss_mb', '-')} | {'cached' if when < started else ''} |")
    return "Stages (wall time and peak memory of each, this process and its child processes apart):\n\n" + \
        "\n".join(rows) + "\n"


def _cmd_help_config(section: str) -> int:
    """`edgeft run --help-config [SECTION]`: the keys of a recipe section or of the profile, or the sections."""
    from edgeft import pipeline
    from edgeft.config import help_lines
    from edgeft.profile import Profile

    sections = {**pipeline.recipe_schema(), "profile": Profile}
    if not section:
        print("config sections (edgeft run --help-config SECTION prints the keys of one):")
        for name in sections:
            where = "device profile YAML" if name == "profile" else "recipe YAML"
            print(f"  {name:<12} {where}; override with {name}.KEY=VALUE")
        return 0
    if section not in sections:
        raise UserError(f"--help-config: unknown section '{section}'; valid sections: {', '.join(sections)}")
    print("\n".join(help_lines(sections[section], section)))
    return 0


def _cmd_show(args) -> int:
    from edgeft import artifact

    chain = artifact.lineage(args.dir)
    for depth, art in enumerate(chain):
        m = art.manifest
        metrics = {k: v for k, v in m.get("metrics", {}).items() if not isinstance(v, (list, dict))}
        pad = "  " * depth
        print(f"{pad}{m['stage']} [{m['kind']}] id={m['id']} {art.path}")
        for k, v in m.get("inputs", {}).items():
            if not isinstance(v, (dict, list)):
                print(f"{pad}  input {k}: {v}")
        print(f"{pad}  metrics: " + ", ".join(f"{k}={v}" for k, v in list(metrics.items())[:8]))
    return 0


def _cmd_export(args) -> int:
    from edgeft import profile
    from edgeft.config import parse_overrides
    from edgeft.stages import bundle as bundle_stage

    overrides = parse_overrides(args.overrides)
    from edgeft.pipeline import EXPORT_STAGES as stages
    bad = [k for k in overrides if k.split(".", 1)[0] not in ("profile", *stages)]
    if bad:
        raise UserError(f"export: override '{bad[0]}' is neither profile.KEY nor {'.KEY nor '.join(stages)}.KEY")
    prof = profile.load(args.profile, {k.split(".", 1)[1]: v for k, v in overrides.items()
                                       if k.startswith("profile.")})
    stage_params: dict = {}
    for k, v in overrides.items():
        if k.split(".", 1)[0] in stages:
            stage_params.setdefault(k.split(".", 1)[0], {})[k.split(".", 1)[1]] = v
    key = None
    if args.sign is not None:  # a wrong key fails before anything is built
        from edgeft.device.signing import load_private

        key = load_private(args.sign)
    out = args.out or Path("dist") / prof.name
    bundle = bundle_stage.run(args.src, bundle_stage.Config(profile=prof, stage_params=stage_params), out,
                              data=args.data)
    signed = ""
    if key is not None:
        from edgeft.device.signing import sign

        signed = f", signed by key {sign(bundle.path, key)['key_id']}"
    print(f"done: bundle {out} ({bundle.manifest['metrics']['variant']}{signed}); try: edgeft ask {out} \"...\"")
    return 0


def _cmd_ask(args) -> int:
    from edgeft.device.ask import Asker, repl
    from edgeft.device.bundle import open_bundle

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    from edgeft.device.signing import trusted_keys

    asker = Asker(open_bundle(args.bundle, trusted=trusted_keys(args.trust)), retrieval=args.retrieval,
                  max_new_tokens=args.max_new_tokens, threads=args.threads)
    try:
        if args.question:
            print(asker.ask(" ".join(args.question)).render())
        else:
            repl(asker)
    finally:
        asker.close()
    return 0


def _cmd_revise_manual(args) -> int:
    from edgeft.device.revise import revise
    from edgeft.device.signing import load_private, trusted_keys

    key = load_private(args.sign) if args.sign is not None else None  # a wrong key fails before anything is read
    rev = revise(args.bundle, args.manual, key=key, trusted=trusted_keys(args.trust))
    if not rev:
        print(f"{args.bundle}: already holds this manual; nothing changed")
        return 0
    signed = f"; re-signed by key {rev['signed_by']}" if rev["signed_by"] else ""
    print(f"done: {args.bundle} answers from {args.manual.name} (sha256 {rev['sha256'][:16]}, was "
          f"{(rev['previous_sha256'] or 'none')[:16]}){signed}; try: edgeft ask {args.bundle} \"...\"")
    return 0


def _cmd_doctor(args) -> int:
    from edgeft.device.doctor import report

    if args.seconds <= 0 or (args.threads is not None and args.threads < 1):
        raise UserError("doctor: --seconds must be > 0 and --threads >= 1")
    from edgeft.device.signing import trusted_keys

    return report(args.bundle, seconds=args.seconds, threads=args.threads, trusted=trusted_keys(args.trust))


def _cmd_keygen(args) -> int:
    from edgeft.device.signing import keygen

    priv, pub = keygen(args.name)
    print(f"private key: {priv} (keep it on the build host: edgeft export --sign {priv})")
    print(f"public key:  {pub} (give it to the devices: edgeft ask --trust {pub}, or append it to "
          "~/.config/edgeft/trusted_keys)")
    return 0


def _cmd_bench(args) -> int:
    from edgeft.bench import command
    from edgeft.bench.select import select
    from edgeft.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    bad = [k for k in overrides if not k.startswith("profile.")]
    if bad:
        raise UserError(f"bench: --set {bad[0]}: only profile.key=value overrides apply here")
    prof = command.load_profile(args.profile, args.paths, {k.split(".", 1)[1]: v for k, v in overrides.items()})
    cfg = command.config_for(prof, samples=args.samples, repeats=args.repeats)
    records = command.run(args.paths, prof, eval_path=args.eval_path, out=args.out, heldout=args.heldout,
                          tokenizer=args.tokenizer, cfg=cfg)
    if args.select:
        pick = select(records, prof, reference=args.reference_score)
        print(f"selected: {pick['name']} ({pick['format']} {pick['quant']}, {pick['size_bytes']} bytes): "
              f"rouge_l {pick['rouge_l']} = {pick['accuracy_kept']:.1%} of tuned (budget {prof.accuracy_budget:.0%}), "
              f"{pick['memory_mb']:.0f} MiB (budget {pick['memory_budget_mb']:.0f} MiB)")
    return 0


def _quiet() -> None:
    """Keep library chatter out of the user's terminal (it stays available with --debug)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit(main())
