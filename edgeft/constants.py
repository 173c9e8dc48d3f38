"""Names that leave the process: file names, artifact kinds, report fields, exit codes."""

MANIFEST_NAME = "manifest.json"  # written last; its presence marks a finished artifact
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"  # staging dirs beside the final artifact dir; never look finished
CKPT_SUFFIX = ".ckpt"  # <out>.ckpt beside a train artifact: resumable checkpoints, removed once it is finished

# Artifact kinds: what the payload of an artifact directory is.
KIND_DATA = "data"  # JSONL splits + manual text
KIND_HF = "hf"  # a transformers model dir (config.json, safetensors, tokenizer)
KIND_ADAPTER = "adapter"  # a peft adapter dir beside a reference to its base
KIND_GGUF = "gguf"  # one or more .gguf files
KIND_ONNX = "onnx"  # one or more onnx model dirs
KIND_BENCH = "bench"  # report.json / .csv / .md
KIND_BUNDLE = "bundle"  # a deployable dist/PROFILE dir: chosen model, tokenizer, report, README, runner
KINDS = (KIND_DATA, KIND_HF, KIND_ADAPTER, KIND_GGUF, KIND_ONNX, KIND_BENCH, KIND_BUNDLE)

# Files inside artifacts.
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
MANUAL_FILE = "manual.txt"
RETRIEVAL_FILE = "retrieval.json"  # data artifact / bundle: the retriever settings a model was tuned with
ADAPTER_DIR = "adapter"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
PRUNE_PLAN_FILE = "prune_plan.json"  # prune: kept blocks, KV groups, MLP and hidden channels
TEACHER_CACHE_FILE = "teacher_logits.safetensors"  # distill: teacher top-k logits cached on disk
# Tokenizer and generation files an artifact carries so the device side can tokenize on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "generation_config.json")

# The fields of one bench record, in report column order.
REPORT_FIELDS = (
    "name", "format", "quant", "size_bytes", "params", "ttft_ms", "prefill_tok_s", "decode_tok_s",
    "peak_rss_mb", "load_s", "exact_match", "token_f1", "rouge_l", "perplexity", "top1_agreement", "kld",
    "predicted_decode_tok_s",
)
REPORT_PLOTS = ("accuracy_vs_size.png", "accuracy_vs_decode.png")  # beside report.md
MANUAL_HELDOUT_FILE = "manual_heldout.txt"  # manual text kept out of every training input, for perplexity

# Exit codes of the CLI.
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1

SMOLLM2 = "smollm2"  # base.model alias: SmolLM2-135M-Instruct, fetched from the package registry
EMBEDDED = "embedded"  # base.model / data.train value that selects the built-in default

# Files inside a bundle (dist/PROFILE); the bundle's manifest.json lists the sha256 of every one.
BUNDLE_FILE = "bundle.json"  # what to run: variant, runtime settings, profile, selection, pre-flight
BUNDLE_MODEL_DIR = "model"  # the chosen artifact's model file(s), config.json and tokenizer files
BUNDLE_README = "README.md"
BUNDLE_RUNNER = "run.sh"
BUNDLE_VERSION = 1
BUNDLE_SUMS = "SHA256SUMS"  # sha256sum -c list run.sh checks before any Python runs
SIGNATURE_FILE = "manifest.sig"  # Ed25519 signature over manifest.json's bytes (edgeft.device.signing)
