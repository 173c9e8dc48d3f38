"""Names that leave the process: file names, artifact kinds, report fields, exit codes."""

MANIFEST_NAME = "manifest.json"  # written last; its presence marks a finished artifact
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"  # staging dirs beside the final artifact dir; never look finished

# Artifact kinds: what the payload of an artifact directory is.
KIND_DATA = "data"  # JSONL splits + manual text
KIND_HF = "hf"  # a transformers model dir (config.json, safetensors, tokenizer)
KIND_ADAPTER = "adapter"  # a peft adapter dir beside a reference to its base
KIND_GGUF = "gguf"  # one or more .gguf files
KIND_ONNX = "onnx"  # one or more onnx model dirs
KIND_BENCH = "bench"  # report.json / .csv / .md
KINDS = (KIND_DATA, KIND_HF, KIND_ADAPTER, KIND_GGUF, KIND_ONNX, KIND_BENCH)

# Files inside artifacts.
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
MANUAL_FILE = "manual.txt"
ADAPTER_DIR = "adapter"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
# Tokenizer and generation files an artifact carries so the device side can tokenize on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "generation_config.json")

# The fields of one bench record, in report column order.
REPORT_FIELDS = (
    "name", "format", "quant", "size_bytes", "ttft_ms", "decode_tok_s", "peak_rss_mb",
    "exact_match", "token_f1", "rouge_l", "top1_agreement",
)

# Exit codes of the CLI.
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1

EMBEDDED = "embedded"  # base.model / data.train value that selects the built-in default
