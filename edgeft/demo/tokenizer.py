"""Train a SentencePiece BPE tokenizer on local text and save it as a transformers tokenizer dir.

BPE (not unigram) because llama.cpp's SPM tokenizer merges by piece score, which reproduces a BPE
model exactly; byte fallback so any input is representable; identity normalisation so newlines and
spacing survive (SentencePiece's default NFKC rule maps "\\n" to a space).
"""

from __future__ import annotations

import io
from pathlib import Path

# A chat template of our own for the embedded default: plain text turns, BOS added by the caller,
# EOS after every assistant turn so generation learns to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, seed: int = 0) -> Path:
    """Train on `texts` and write tokenizer.model + tokenizer.json + config files to `out_dir`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,  # part numbers and torque values read digit by digit
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,  # deterministic piece order
        minloglevel=2,
    )
    sp_path = out_dir / "tokenizer.model"
    sp_path.write_bytes(model.getvalue())
    tok = LlamaTokenizerFast(vocab_file=str(sp_path), add_prefix_space=True, legacy=False,
                             add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.unk_token  # the pad id is masked out everywhere; unk never appears in our text
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return out_dir
