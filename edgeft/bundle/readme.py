"""The field team's README and the runner script written into every bundle."""

from __future__ import annotations

from edgeft.bench.report import markdown
from edgeft.constants import BUNDLE_FILE, BUNDLE_RUNNER, REPORT_MD

_COLUMNS = ["name", "format", "quant", "size_bytes", "decode_tok_s", "predicted_decode_tok_s", "peak_rss_mb",
            "predicted_footprint_mb", "rouge_l", "exact_match", "top1_agreement"]


def readme(spec: dict, records: list[dict]) -> str:
    """Markdown: what is in the bundle, how to install and run it, and what the numbers mean."""
    prof, sel, var, rt = spec["profile"], spec["selected"], spec["variant"], spec["runtime"]
    pre = spec["preflight"]["chosen"]
    host = spec["built_on"]
    gpu = (f"llama.cpp offloads {'all' if rt['n_gpu_layers'] == -1 else rt['n_gpu_layers']} layers to the GPU"
           if var["format"] == "gguf" and rt["n_gpu_layers"] else
           f"onnxruntime runs on {rt['onnx_provider']}" if var["format"] == "onnx" else "llama.cpp runs on the CPU")
    cols = [c for c in _COLUMNS if any(c in r for r in records)]
    lines = [
        f"# {prof['name']} bundle: {var['name']}",
        "",
        f"{prof['description']}".strip(),
        "",
        f"The model answers questions about the service manual it was tuned on. This bundle runs the "
        f"**{var['format'].upper()} {var['quant']}** variant ({sel['size_bytes'] / 2**20:.1f} MiB); {gpu}, "
        f"{rt['threads']} CPU thread{'s' if rt['threads'] != 1 else ''}, up to {rt['n_ctx']} tokens of context.",
        "",
        "## Install (once, on the device)",
        "",
        "```sh",
        prof["install"],
        "```",
        "",
        "No PyTorch is needed: the device side uses numpy, tokenizers and the runtime above.",
        "",
        "## Run",
        "",
        "```sh",
        f"./{BUNDLE_RUNNER} \"{spec.get('example_question', 'your question')}\"",
        "    # one answer, with the manual passage it used",
        f"./{BUNDLE_RUNNER}                      # interactive: one question per line, Ctrl-D ends",
        *([] if spec.get("retrieval") else
          ["edgeft ask --retrieval off . \"...\"    # the model alone, no manual lookup"]),
        "edgeft doctor .                       # runtimes, GPU, memory and a 10 s speed check",
        "```",
        "",
        *_grounded(spec),
        "Every run first checks the sha256 of every file against `manifest.json` and refuses a bundle "
        "with a changed, missing or extra model file (copy the bundle again if that happens).",
        "",
        "## What the numbers mean",
        "",
        f"- **Chosen by the gate:** the smallest variant that keeps at least {prof['accuracy_budget']:.0%} of the "
        f"tuned model's rouge_l on held-out questions and fits the {prof['memory_budget_gb']:g} GiB memory budget. "
        f"This one keeps {_pct(sel.get('accuracy_kept'))} (rouge_l {_num(sel.get('rouge_l'))}, exact match "
        f"{_num(sel.get('exact_match'))}).",
        f"- **Memory on the device (pre-flight estimate):** {pre['total_gb']:.3g} GiB = weights "
        f"{pre['weights_gb']:.3g} + KV cache {pre['kv_cache_gb']:.3g} at {pre['context_length']} tokens + runtime "
        f"{pre['overhead_gb']:.3g}, against a budget of {pre['budget_gb']:g} GiB.",
        f"- **Speed on the device (predicted):** at most {pre['predicted_decode_tok_s']:.0f} tokens/s, from "
        f"{prof['bandwidth_gbs']:g} GB/s of memory bandwidth divided by the bytes read per token; real "
        "decoding typically reaches 60-80% of this bound. `edgeft doctor .` measures it on the device.",
        f"- **Speed measured on the build host:** {_num(sel.get('decode_tok_s'))} tokens/s decode, "
        f"{_num(sel.get('ttft_ms'))} ms to the first token ({host['cpu']}, {rt['threads']} threads). "
        "A different machine: compare with `edgeft doctor`, not with this figure.",
        "- **Accuracy columns:** exact_match and rouge_l compare answers with the manual's reference "
        "answers; top1_agreement is the share of answer tokens where this variant's top choice equals the "
        "tuned model's.",
        "",
        "## Every variant built for this profile (bench on the build host)",
        "",
        markdown(records, cols).rstrip(),
        "",
        f"Full report: `{REPORT_MD}` and `report.json`; settings the runner uses: `{BUNDLE_FILE}`.",
        "",
    ]
    notes = spec["preflight"].get("notes") or []
    if notes:
        lines += ["## Pre-flight", "", *[f"- {n.removeprefix('pre-flight: ')}" for n in notes], ""]
    return "\n".join(lines)


def _grounded(spec: dict) -> list[str]:
    """What a model tuned with retrieval answers, and how a revised manual gets in: README paragraphs."""
    if not spec.get("retrieval"):
        return []
    k = spec["retrieval"]["k"]
    return [
        f"This model was tuned to answer from the {k} manual passages that best match the question. It "
        "answers with the passage it used (`[source: manual.txt:LINE ...]`), says \"The manual does not "
        "cover this.\" when none holds the answer (at once, without running the model, when the question "
        "names a code or part number the manual lacks), and marks an answer it could not check against "
        "the cited passage as not verified.",
        "",
        "A revised manual goes in without retraining, on the build host: `edgeft revise-manual . "
        "manual-new.txt --sign KEY` (checks the bundle, re-hashes it, re-signs it).",
        "",
    ]


def runner() -> str:
    """A POSIX shell runner: check the bundle's files, then ask it (interactive without a question).

    No code from the bundle can run: the checksums are checked with sha256sum before any Python starts,
    Python runs isolated (-I: no PYTHONPATH, no user site, no script or current dir on sys.path) from /,
    and `edgeft ask` then verifies the manifest (and its signature, where the device trusts keys)."""
    return """#!/bin/sh
# Ask this bundle's model: ./run.sh "question"  (no question: interactive). Needs: pip install 'edgeft[device]'
set -u
here="$(cd "$(dirname "$0")" && pwd -P)"
if command -v sha256sum >/dev/null 2>&1; then
  (cd "$here" && sha256sum --quiet --strict -c SHA256SUMS) >&2 || {
    echo "edgeft: error: $here: files do not match SHA256SUMS (tampered or corrupted); copy the bundle again" >&2
    exit 2
  }
fi
cd / || exit 2
interp=""
if command -v edgeft >/dev/null 2>&1; then  # the interpreter edgeft was installed into, from its shebang
  interp="$(head -n 1 "$(command -v edgeft)" | sed -n 's/^#![[:space:]]*\([^[:space:]]*\).*/\1/p')"
fi
for py in $interp python3 python; do
  if command -v "$py" >/dev/null 2>&1 && "$py" -I -c "import edgeft" >/dev/null 2>&1; then
    exec "$py" -I -m edgeft.cli ask "$here" "$@"
  fi
done
echo "edgeft is not installed: see $here/README.md (Install)" >&2
exit 2
"""


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
