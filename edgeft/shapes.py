"""The shape of a decoder model: attention geometry from its config, parameter counts from its safetensors
headers, and the KV cache size that follows. Torch-free (stdlib only), so the device side can use it.

Every function taking `cfg` accepts a config.json dict or a transformers PretrainedConfig (any object with
the config's keys as attributes). Multimodal wrappers keep the decoder's config under `text_config`; it is
unwrapped first. The HF defaults apply: head_dim = hidden_size // num_attention_heads when the config has
none (gemma3 has its own: 256 with hidden 640 and 4 heads), num_key_value_heads = num_attention_heads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeft import safetensors_file
from edgeft.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """What the pre-flight estimate needs from an hf model dir."""

    embed_params: int  # the input embedding table
    head_params: int  # the LM head (0 when tied to the embeddings)
    matrix_params: int  # every other 2-D weight
    vector_params: int  # norms and biases (kept in fp32 by every exporter)
    n_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int  # the model's max_position_embeddings (0 = unknown)

    @property
    def params(self) -> int:
        return self.embed_params + self.head_params + self.matrix_params + self.vector_params


def decoder_config(cfg):
    """The decoder's config: `text_config` of a multimodal wrapper, else `cfg` itself."""
    return _get(cfg, "text_config") or cfg


def n_heads(cfg) -> int:
    """Query heads per layer (num_attention_heads)."""
    return int(_need(decoder_config(cfg), "num_attention_heads"))


def head_dim(cfg) -> int:
    """Width of one attention head: the config's head_dim, else hidden_size // num_attention_heads."""
    c = decoder_config(cfg)
    return int(_get(c, "head_dim") or _need(c, "hidden_size") // n_heads(c))


def kv_heads(cfg) -> int:
    """Key/value heads per layer (num_key_value_heads; without one, every query head has its own)."""
    return int(_get(decoder_config(cfg), "num_key_value_heads") or n_heads(cfg))


def n_layers(cfg) -> int:
    """Decoder blocks (num_hidden_layers)."""
    return int(_need(decoder_config(cfg), "num_hidden_layers"))


def max_positions(cfg) -> int:
    """max_position_embeddings, 0 when the config has none."""
    return int(_get(decoder_config(cfg), "max_position_embeddings") or 0)


def kv_bytes_per_token(cfg_or_shape, bytes_per_value: int) -> int:
    """KV cache bytes per context position: K and V of every layer, kv_heads x head_dim values each.

    `cfg_or_shape` is a ModelShape or a config (dict or object, see the module doc)."""
    if isinstance(cfg_or_shape, ModelShape):
        layers, kv, d = cfg_or_shape.n_layers, cfg_or_shape.kv_heads, cfg_or_shape.head_dim
    else:
        layers, kv, d = n_layers(cfg_or_shape), kv_heads(cfg_or_shape), head_dim(cfg_or_shape)
    return 2 * layers * kv * d * bytes_per_value


def model_shape(hf_dir: Path) -> ModelShape:
    """Parameter counts from the safetensors headers and the attention shape from config.json."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir}: no config.json; pre-flight needs an hf model dir (the merge or train output)")
    cfg = decoder_config(json.loads(cfg_path.read_text()))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights; save the model with safe_serialization=True")
    embed = head = matrix = vector = 0
    for f in files:
        for t in safetensors_file.tensors(f):
            if "embed_tokens" in t.name or t.name.endswith("wte.weight"):
                embed += t.numel
            elif t.name.startswith("lm_head") or t.name.endswith("output.weight"):
                head += t.numel
            elif t.ndim >= 2:
                matrix += t.numel
            else:
                vector += t.numel
    return ModelShape(embed_params=embed, head_params=head, matrix_params=matrix, vector_params=vector,
                      n_layers=n_layers(cfg), kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
                      max_positions=max_positions(cfg))


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _need(cfg, key: str):
    """cfg[key]: a missing key raises KeyError (dict) or AttributeError (object), as plain access would."""
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
