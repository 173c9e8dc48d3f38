"""Translate an HF tokenizer dir into GGUF tokenizer metadata, or refuse: never a guess.

Two tokenizer families are supported, as llama.cpp names them: "llama" (SentencePiece, read from
tokenizer.model: pieces, scores, piece types) and "gpt2" (byte-level BPE from tokenizer.json: vocab,
merges, and a pre-tokenizer that must be one llama.cpp knows by name). Padding rows of the embedding
beyond the tokenizer become `[PAD{i}]` UNUSED tokens, as llama.cpp's own converter writes them: an
unused token is never produced by tokenization, whereas a user-defined one would match its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import TokenType

from edgeft.errors import UserError

# Byte-level BPE pre-tokenizers llama.cpp knows by name: the regex in tokenizer.json must match exactly.
PRE_TOKENIZER_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
}
# Byte-level pre-tokenizers without a Split step: ByteLevel's own (GPT-2) regex, optionally after a
# split into single digits (SmolLM); llama.cpp names them "gpt-2" and "smollm"
BYTELEVEL_PRE = {(): "gpt-2", ("digits",): "smollm"}
_SPECIALS = ("bos", "eos", "unk", "pad")
_SP_BPE = 2  # sentencepiece TrainerSpec.ModelType.BPE


@dataclass
class Vocab:
    """Everything the GGUF tokenizer keys hold."""

    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece piece scores (merge priority)
    merges: list[str] | None = None  # byte-level BPE merges, "a b"
    pre: str | None = None  # byte-level BPE pre-tokenizer name
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece only
    remove_extra_whitespaces: bool | None = None  # SentencePiece only
    chat_template: str | list | None = None


def family_of(hf_dir: Path, default: str) -> str:
    """'gpt2' when tokenizer.json is a byte-level BPE (SmolLM2, Llama 3, Qwen), 'spm' when the dir holds a
    SentencePiece model, else the architecture's `default`."""
    tok_json = _json(hf_dir / "tokenizer.json")
    model = tok_json.get("model") or {}
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") == "BPE" and any(s.get("type") == "ByteLevel" for s in steps):
        return "gpt2"
    if _is_sentencepiece(hf_dir / "tokenizer.model"):
        return "spm"
    return default


def _is_sentencepiece(path: Path) -> bool:
    """A SentencePiece model proto, not the copy of a whole GGUF that transformers 4.57 saves under that name."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) != b"GGUF"


def load(hf_dir: Path, family: str, n_rows: int, config: dict) -> Vocab:
    """Read the tokenizer of `hf_dir` for an embedding of `n_rows` rows."""
    tok_cfg = _json(hf_dir / "tokenizer_config.json")
    tok_json = _json(hf_dir / "tokenizer.json")
    family = family_of(hf_dir, family)
    if family == "spm":
        vocab = _load_spm(hf_dir, tok_cfg, tok_json)
    elif family == "gpt2":
        vocab = _load_gpt2(hf_dir, tok_cfg, tok_json)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}")
    if len(vocab.tokens) > n_rows:
        raise UserError(f"{hf_dir}: tokenizer has {len(vocab.tokens)} tokens but the embedding only {n_rows} "
                        "rows; resize the embeddings (model.resize_token_embeddings) and re-save")
    for i in range(1, n_rows - len(vocab.tokens) + 1):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for name in _SPECIALS:
        tid = _special_id(name, config, tok_cfg, index, hf_dir)
        if tid is not None:
            vocab.special_ids[name] = tid
    if "unk" not in vocab.special_ids and vocab.model == "llama":
        unk = [i for i, t in enumerate(vocab.types) if t == TokenType.UNKNOWN]
        if unk:
            vocab.special_ids["unk"] = unk[0]
    vocab.chat_template = _chat_template(hf_dir, tok_cfg)
    return vocab


def write(w: gguf.GGUFWriter, v: Vocab) -> None:
    """Add the tokenizer keys to a GGUFWriter."""
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
              "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for name, tid in v.special_ids.items():
        adders[name](tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.remove_extra_whitespaces is not None:
        w.add_remove_extra_whitespaces(v.remove_extra_whitespaces)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def _load_spm(hf_dir: Path, tok_cfg: dict, tok_json: dict) -> Vocab:
    sp_file = hf_dir / "tokenizer.model"
    if not _is_sentencepiece(sp_file):
        raise UserError(f"{hf_dir}: no tokenizer.model; the llama GGUF export needs the SentencePiece model "
                        "(save the tokenizer with a slow/SentencePiece-backed class so it is written)")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_file.read_bytes())
    except Exception as e:  # protobuf raises DecodeError subclasses that vary across versions
        raise UserError(f"{sp_file}: not a SentencePiece model ({e})") from None
    # llama.cpp's SPM tokenizer merges pieces by score, which reproduces SentencePiece BPE only (not
    # unigram's Viterbi), and applies no normalization rule (nmt_nfkc would turn "\n" into a space)
    if proto.trainer_spec.model_type != _SP_BPE:
        raise UserError(f"{sp_file}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE "
                        f"({_SP_BPE}); llama.cpp would tokenize it differently")
    if proto.normalizer_spec.name != "identity" or proto.normalizer_spec.precompiled_charsmap:
        raise UserError(f"{sp_file}: SentencePiece normalization {proto.normalizer_spec.name!r}; llama.cpp "
                        "applies none, so tokenization would differ. Retrain the tokenizer with "
                        "normalization_rule_name='identity' (see edgeft/demo/tokenizer.py)")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # the proto's piece types are gguf.TokenType values
    _merge_added_tokens(tokens, types, scores, tok_json, hf_dir)
    space_prefix = tok_cfg.get("add_prefix_space")  # HF's own switch wins over the SentencePiece model's
    if space_prefix is None:
        space_prefix = proto.normalizer_spec.add_dummy_prefix
    return Vocab(
        model="llama", tokens=tokens, types=types, scores=scores,
        add_bos=bool(tok_cfg.get("add_bos_token", True)), add_eos=bool(tok_cfg.get("add_eos_token", False)),
        add_space_prefix=bool(space_prefix),
        remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
    )


def _merge_added_tokens(tokens: list[str], types: list[int], scores: list[float] | None,
                        tok_json: dict, hf_dir: Path) -> None:
    """HF added tokens: the same piece marks it control; a new id right after the vocab is appended."""
    for added in sorted(tok_json.get("added_tokens") or [], key=lambda a: a["id"]):
        tid, content = added["id"], added["content"]
        ttype = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        if tid < len(tokens):
            if tokens[tid] != content:
                raise UserError(f"{hf_dir / 'tokenizer.json'}: added token {content!r} has id {tid}, "
                                f"which is {tokens[tid]!r} in the tokenizer model; GGUF cannot hold both")
            if types[tid] == TokenType.NORMAL:
                types[tid] = ttype
        elif tid == len(tokens):
            tokens.append(content)
            types.append(ttype)
            if scores is not None:
                scores.append(0.0)
        else:
            raise UserError(f"{hf_dir / 'tokenizer.json'}: added token {content!r} has id {tid}, leaving a "
                            f"gap after the {len(tokens)} known tokens; GGUF token ids must be contiguous")


def _load_gpt2(hf_dir: Path, tok_cfg: dict, tok_json: dict) -> Vocab:
    where = hf_dir / "tokenizer.json"
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{where}: tokenizer model {model.get('type')!r}; this architecture needs a "
                        "byte-level BPE")
    pre = _gpt2_pre_name(tok_json.get("pre_tokenizer") or {}, where)
    by_id = {i: t for t, i in model["vocab"].items()}
    for added in tok_json.get("added_tokens") or []:
        if by_id.get(added["id"], added["content"]) != added["content"]:
            raise UserError(f"{where}: added token {added['content']!r} reuses id {added['id']}")
        by_id[added["id"]] = added["content"]
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{where}: token ids are not contiguous from 0; GGUF cannot represent the gaps")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(TokenType.NORMAL)] * len(tokens)
    for added in tok_json.get("added_tokens") or []:
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
                 add_bos=bool(tok_cfg.get("add_bos_token", False)),  # byte-level BPE tokenizers add none
                 add_eos=bool(tok_cfg.get("add_eos_token", False)))


def _gpt2_pre_name(pre: dict, where: Path) -> str:
    """The llama.cpp pre-tokenizer name whose splitting equals tokenizer.json's, byte-level included."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    others = tuple("digits" if s.get("type") == "Digits" and s.get("individual_digits") else s.get("type")
                   for s in steps if s.get("type") not in ("ByteLevel", "Split"))
    if len(byte_level) != 1:
        raise UserError(f"{where}: pre-tokenizer has no byte-level step; GGUF export cannot map it")
    if not regexes and byte_level[0].get("use_regex", True) and others in BYTELEVEL_PRE:
        return BYTELEVEL_PRE[others]
    if len(regexes) != 1 or others:
        raise UserError(f"{where}: pre-tokenizer is not one regex split + byte-level, nor a known byte-level "
                        f"sequence; GGUF export cannot map it")
    for name, regex in PRE_TOKENIZER_REGEX.items():
        if regexes[0] == regex:
            return name
    raise UserError(f"{where}: pre-tokenizer regex is not one llama.cpp knows "
                    f"(known: {', '.join([*PRE_TOKENIZER_REGEX, *BYTELEVEL_PRE.values()])})")


def _special_id(name: str, config: dict, tok_cfg: dict, index: dict[str, int], hf_dir: Path) -> int | None:
    """The model config's id first (what generation uses), else the tokenizer config's token text."""
    tid = config.get(f"{name}_token_id")
    if isinstance(tid, list):
        tid = tid[0] if tid else None
    if tid is None:
        text = tok_cfg.get(f"{name}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if text is None:
            return None
        if text not in index:
            raise UserError(f"{hf_dir / 'tokenizer_config.json'}: {name}_token {text!r} is not in the vocab")
        tid = index[text]
    if not 0 <= tid < len(index):
        raise UserError(f"{hf_dir / 'config.json'}: {name}_token_id {tid} is outside the vocab "
                        f"of {len(index)}")
    return int(tid)


def _chat_template(hf_dir: Path, tok_cfg: dict) -> str | list | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return tok_cfg.get("chat_template")


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
