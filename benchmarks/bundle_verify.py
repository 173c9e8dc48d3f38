"""What verifying a signed bundle costs `edgeft ask`, against the first answer it gives.

Signs a copy of BUNDLE with a fresh key, then per repeat, interleaved in fresh processes: (a) open and
verify the bundle as `ask` does (signature against the trusted key, sha256 of every file, verified
bytes kept); (b) the first answer: runtime load, prompt, greedy generation. Prints medians and the
ratio verification / first answer (target < 0.10).

    .venv/bin/python benchmarks/bundle_verify.py dist/x86-cpu [--repeats 5]

--smoke (no BUNDLE): builds a tiny bundle itself under --work (the benchmarks' tiny RANDOM-WEIGHT Llama, GGUF
q8_0, profile tiny; benchmarks.common.build_smoke_bundle) and runs 2 repeats: every code path in seconds; its
ratio says nothing about a real bundle (the model is a few MB, its answer a few tokens).

    .venv/bin/python benchmarks/bundle_verify.py --smoke [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeft import host  # noqa: E402

_CHILD = """
import json, sys, time
sys.modules["torch"] = None  # as on a device
from edgeft.device.bundle import open_bundle
from edgeft.device.ask import Asker
from edgeft.device.signing import trusted_keys
t0 = time.perf_counter()
b = open_bundle(sys.argv[1], trusted=trusted_keys([sys.argv[2]]))
verify = time.perf_counter() - t0
t0 = time.perf_counter()
a = Asker(b, threads=int(sys.argv[3]))
ans = a.ask(b.spec["example_question"])
first = time.perf_counter() - t0
a.close()
print(json.dumps({"verify_s": verify, "first_answer_s": first, "files": len(b.manifest["files"]),
                  "bytes": sum(f["size"] for f in b.manifest["files"].values()), "tokens": ans.tokens}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="bundle dir (not with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh-process runs (default 5; --smoke 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-bundle-verify.json"))
    ap.add_argument("--smoke", action="store_true",
                    help="build a tiny random-weight bundle under --work, 2 repeats: measures nothing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-bundle-verify"),
                    help="--smoke: scratch dir for the tiny run and bundle (removed afterwards)")
    args = ap.parse_args()
    started = time.time()
    if args.smoke:
        if args.bundle:
            ap.error("--smoke builds its own bundle: pass no BUNDLE")
        from benchmarks.common import build_smoke_bundle

        args.repeats = args.repeats or 2
        work = args.work / "smoke"
        shutil.rmtree(work, ignore_errors=True)
        try:
            args.bundle, _ = build_smoke_bundle(work)
            measure(args, started)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.bundle is None:
        ap.error("BUNDLE is required (or --smoke)")
    args.repeats = args.repeats or 5
    measure(args, started)


def measure(args, started: float) -> None:
    """Sign a copy of args.bundle, time verify and first answer in fresh processes; print and write JSON."""
    from edgeft.device.signing import keygen, load_private, sign

    with tempfile.TemporaryDirectory(prefix="edgeft-verify-") as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, copy)
        priv, pub = keygen(Path(tmp) / "key")
        sig = sign(copy, load_private(priv))
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(copy), str(pub), str(args.threads)],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr.strip().splitlines()[-1])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    v = statistics.median(r["verify_s"] for r in runs)
    f = statistics.median(r["first_answer_s"] for r in runs)
    cpu = host.describe()
    out = {"cpu": cpu["cpu"], "bundle": str(args.bundle), "files": runs[0]["files"], "bytes": runs[0]["bytes"],
           "key_id": sig["key_id"], "verify_s": v, "first_answer_s": f, "ratio": v / f,
           "verify_runs": [round(r["verify_s"], 4) for r in runs],
           "first_answer_runs": [round(r["first_answer_s"], 4) for r in runs]}
    if args.smoke:
        out.update(smoke=True, repeats=args.repeats, model="tiny random-weight Llama (benchmarks.common.SMOKE_MODEL), "
                                                           "GGUF q8_0: the ratio says nothing about a real bundle",
                   wall_s=round(time.time() - started, 1))
    print(f"cpu: {cpu['cpu']}; bundle {args.bundle}: {out['files']} files, {out['bytes'] / 2**20:.1f} MiB, signed")
    print(f"verify (signature + sha256 of every file): {v * 1000:.1f} ms; first answer (load + generate "
          f"{runs[0]['tokens']} tokens): {f * 1000:.1f} ms; ratio {v / f:.3f} (target < 0.10)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
