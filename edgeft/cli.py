"""Command line: edgeft run | show | bench-report.

Errors end in one line on stderr naming what to fix, exit code 2 for bad input and 1 for a failed
run; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from edgeft.errors import EdgeftError, UserError

EXAMPLES = """examples:
  edgeft run --recipe recipes/demo.yaml --profile x86-cpu --out runs/demo
  edgeft run --recipe recipes/demo.yaml --profile jetson --out runs/j data.train=my.jsonl base.model=org/model
  edgeft show runs/demo/bench
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgeft` command."""
    parser = argparse.ArgumentParser(prog="edgeft", description="fine-tune, compress, export and bench small LLMs",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the whole chain of a recipe for a device profile")
    p_run.add_argument("--recipe", required=True, type=Path, help="recipe YAML (base model, data, stage params)")
    p_run.add_argument("--profile", default="x86-cpu", help="device profile name (profiles/) or YAML path")
    p_run.add_argument("--out", required=True, type=Path, help="run directory (one artifact dir per stage)")
    p_run.add_argument("overrides", nargs="*", metavar="key=value",
                       help="typed overrides: section.key=value (base.model=, data.train=, train.method=, "
                            "profile.threads=, ...)")
    p_show = sub.add_parser("show", help="print an artifact's lineage back to the data")
    p_show.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet()
    try:
        if args.cmd == "run":
            return _cmd_run(args)
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

    if not args.recipe.is_file():
        raise UserError(f"--recipe: file not found: {args.recipe}")
    overrides = parse_overrides(args.overrides)
    prof_over = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("profile.")}
    rec_over = {k: v for k, v in overrides.items() if not k.startswith("profile.")}
    prof = profile.load(args.profile, prof_over)
    recipe = pipeline.load_recipe(args.recipe, rec_over)
    arts = pipeline.run(recipe, prof, args.out)
    print("\n" + (arts["bench"].path / "report.md").read_text(), flush=True)
    print(f"done: {len(arts)} artifacts in {args.out}; report: {arts['bench'].path / 'report.md'}")
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


def _quiet() -> None:
    """Keep library chatter out of the user's terminal (it stays available with --debug)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit(main())
