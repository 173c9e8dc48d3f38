"""Structured pruning on the tiny Llama: sizes, config consistency, identity, block choice, exports."""

import json
from pathlib import Path

import pytest
import torch

from edgeft import artifact, records
from edgeft.constants import PRUNE_PLAN_FILE
from edgeft.errors import UserError
from edgeft.runtime.prompt import PromptFormatter
from edgeft.stages import data, prune
from edgeft.training import examples, sparsity


@pytest.fixture(scope="module")
def data_art(tmp_path_factory, tiny_qa_jsonl):
    out = tmp_path_factory.mktemp("prune-data") / "data"
    return data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), out)


@pytest.fixture(scope="module")
def tuned_art(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama published as an hf artifact (what merge hands to prune)."""
    import shutil

    def payload(tmp: Path) -> dict:
        for f in tiny_llama_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
        return {}

    return artifact.build(tmp_path_factory.mktemp("prune-src") / "merge", kind="hf", stage="merge", params={},
                          parent=None, payload=payload)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _examples(model_dir, qa_path, n=16):
    fmt = PromptFormatter(model_dir)
    return examples.calibration(fmt, records.load_records(qa_path), n, 64, 0)


def test_pruning_nothing_keeps_logits_identical(tiny_llama_dir, tiny_qa_jsonl):
    model = _load(tiny_llama_dir)
    calib = _examples(tiny_llama_dir, tiny_qa_jsonl)
    imp = prune.importance(model, calib, 0, 8)
    same = prune.prune_model(model, prune.make_plan(model, imp, prune.current_sizes(model)))
    ids = torch.tensor([calib[0][0]])
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)
    assert prune.n_params(same) == prune.n_params(model)


@pytest.mark.parametrize("dead", [0, 1])
def test_depth_drops_the_block_that_changes_nothing(tiny_llama_dir, tiny_qa_jsonl, dead):
    """A block whose output projections are zero passes its input through: block influence 0, dropped first."""
    model = _load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[dead].self_attn.o_proj.weight.zero_()
        model.model.layers[dead].mlp.down_proj.weight.zero_()
    calib = _examples(tiny_llama_dir, tiny_qa_jsonl)
    imp = prune.importance(model, calib, 0, 8)
    assert imp["block"][dead] < 1e-6 < imp["block"][1 - dead]
    sizes = {**prune.current_sizes(model), "layers": 1}
    plan = prune.make_plan(model, imp, sizes)
    assert plan["layers"] == [1 - dead]
    small = prune.prune_model(model, plan)
    ids = torch.tensor([calib[1][0]])
    with torch.no_grad():  # removing an identity block changes nothing
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_width_keeps_the_most_active_channels_and_groups(tiny_llama_dir, tiny_qa_jsonl):
    model = _load(tiny_llama_dir)
    with torch.no_grad():  # silence KV group 0 of block 0 (its query heads' output) and MLP channels 0..99
        model.model.layers[0].self_attn.v_proj.weight[:64].zero_()
        model.model.layers[0].mlp.up_proj.weight[:100].zero_()
    imp = prune.importance(model, _examples(tiny_llama_dir, tiny_qa_jsonl), 0, 8)
    plan = prune.make_plan(model, imp, {**prune.current_sizes(model), "kv_groups": 1, "intermediate_size": 512})
    assert plan["kv"][0] == [1]
    assert min(plan["ffn"][0]) >= 100 and len(plan["ffn"][0]) == 512


def test_stage_writes_a_consistent_smaller_model(tuned_art, data_art, tmp_path):
    cfg = prune.Config(layers=1, intermediate_size=256, kv_groups=1, calib_samples=12, max_length=64)
    art = prune.run(tuned_art, cfg, tmp_path / "prune", data=data_art)
    small = _load(art.path)
    c = small.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads,
            c.head_dim, c.hidden_size) == (1, 256, 1, 2, 64, 256)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (128, 256)
    assert small.model.layers[0].self_attn.k_proj.weight.shape == (64, 256)
    assert small.model.layers[0].mlp.down_proj.weight.shape == (256, 256)
    m = art.metrics
    assert m["params_after"] == prune.n_params(small) < m["params_before"]
    assert m["sizes_after"] == {"layers": 1, "intermediate_size": 256, "kv_groups": 1, "hidden_size": 256}
    assert len(m["kept_layers"]) == 1 and m["size_bytes"] > 0
    plan = json.loads((art.path / PRUNE_PLAN_FILE).read_text())
    assert len(plan["ffn"][str(m["kept_layers"][0])]) == 256
    with torch.no_grad():
        assert torch.isfinite(small(torch.tensor([[1, 5, 9, 11]])).logits).all()


def test_ratio_search_lands_near_the_target(tiny_llama_dir, tiny_qa_jsonl):
    model = _load(tiny_llama_dir)
    calib = _examples(tiny_llama_dir, tiny_qa_jsonl, 8)
    imp = prune.importance(model, calib, 0, 8)
    cfg = prune.Config(ratio=0.4, candidates=3)
    sizes, scored = prune.choose_sizes(model, imp, calib, 0, cfg)
    full = prune.n_params(model)
    assert len(scored) == 3 and all(r["params"] <= 0.6 * full + 0.05 * full for r in scored)
    assert sizes["intermediate_size"] % 256 == 0 or sizes["intermediate_size"] == 640
    small = prune.prune_model(model, prune.make_plan(model, imp, sizes))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert prune.n_params(small) == prune.count_params(shapes, model.config, sizes)
    chosen = min(scored, key=lambda r: r["calib_loss"])
    assert {k: chosen[k] for k in sizes} == sizes


def test_bad_sizes_are_refused(tiny_llama_dir, tiny_qa_jsonl):
    with pytest.raises(UserError, match="prune.ratio"):
        prune.validate(prune.Config(ratio=0.95))
    with pytest.raises(UserError, match="prune.axes"):
        prune.validate(prune.Config(axes="depth,colour"))
    model = _load(tiny_llama_dir)
    calib = _examples(tiny_llama_dir, tiny_qa_jsonl, 4)
    imp = prune.importance(model, calib, 0, 4)
    with pytest.raises(UserError, match="prune.kv_groups: 3 not in 1..2"):
        prune.choose_sizes(model, imp, calib, 0, prune.Config(kv_groups=3))


def test_pruned_heads_export_to_gguf_with_parity(tuned_art, data_art, tmp_path):
    """Fewer heads than hidden/head_dim: the GGUF writer must carry head_dim; llama.cpp must match torch."""
    from edgeft.stages import export_gguf

    cfg = prune.Config(kv_groups=1, intermediate_size=256, calib_samples=8, max_length=64)
    art = prune.run(tuned_art, cfg, tmp_path / "prune", data=data_art)
    gg = export_gguf.run(art, export_gguf.Config(types=("f16",)), tmp_path / "gguf")
    assert (gg.path / "model-f16.gguf").is_file()
    assert gg.metrics["parity"]  # the export stage's own gate ran (it raises on a mismatch)


def test_hidden_channels_prune_embeddings_norms_and_every_projection(tiny_llama_dir, tiny_qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _load(tiny_llama_dir)
    calib = _examples(tiny_llama_dir, tiny_qa_jsonl, 8)
    imp = prune.importance(model, calib, 0, 8)
    sizes = {**prune.current_sizes(model), "hidden_size": 128}
    plan = prune.make_plan(model, imp, sizes)
    small = prune.prune_model(model, plan)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.config.hidden_size == 128 and again.config.head_dim == 64
    assert again.model.embed_tokens.weight.shape[1] == again.lm_head.weight.shape[1] == 128
    assert again.model.layers[0].self_attn.q_proj.weight.shape == (256, 128)  # all 4 heads of 64 kept
    kept = torch.tensor(plan["hid"])
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept])
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert prune.n_params(again) == prune.count_params(shapes, model.config, sizes)


def test_qwen2_with_qkv_bias_prunes_to_a_loadable_model(tmp_path):
    """Biased q/k/v projections (Qwen2) are sliced with their heads; nothing pruned = identical logits."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    g = torch.Generator().manual_seed(1)
    examples = [(x, x) for x in torch.randint(0, 300, (6, 20), generator=g).tolist()]
    imp = prune.importance(model, examples, 0, 3)
    ids = torch.tensor([examples[0][0]])
    same = prune.prune_model(model, prune.make_plan(model, imp, prune.current_sizes(model)))
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)
    sizes = {"layers": 2, "intermediate_size": 128, "kv_groups": 1, "hidden_size": 128}
    small = prune.prune_model(model, prune.make_plan(model, imp, sizes))
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.model.layers[0].self_attn.k_proj.bias.shape == (32,)
    assert prune.n_params(again) == prune.count_params({n: tuple(p.shape) for n, p in model.state_dict().items()},
                                                       model.config, sizes)


def test_sparsify_zeroes_each_row_by_wanda_or_magnitude_score():
    """By hand: one Linear, one loud input channel. Magnitude drops its small weight, Wanda keeps it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    examples = [([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])] * 2
    w0 = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    mag = LlamaForCausalLM(cfg).eval()
    mag.load_state_dict(model.state_dict())
    assert sparsity.sparsify(mag, examples, 0, 2, 0.5, "magnitude") == 0.5
    down = mag.model.layers[0].mlp.down_proj.weight
    assert ((down == 0).sum(1) == 8).all()  # half of each row of 16
    ref = w0["model.layers.0.mlp.down_proj"]
    kept = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, torch.topk(ref.abs(), 8, dim=1).indices, True)
    assert torch.equal(down != 0, kept)  # the 8 largest |w| of each row survive
    assert torch.equal(mag.lm_head.weight, w0["lm_head"])  # only decoder-block projections are sparsified

    # Wanda: scale the down_proj input channel 0 up 1000x through up_proj; its weights then score high
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0] *= 1000
        model.model.layers[0].mlp.down_proj.weight[:, 0] = 1e-4  # tiny weights on the loud channel
    wanda = LlamaForCausalLM(cfg).eval()
    wanda.load_state_dict(model.state_dict())
    sparsity.sparsify(wanda, examples, 0, 2, 0.5, "wanda")
    assert (wanda.model.layers[0].mlp.down_proj.weight[:, 0] != 0).all()
    sparsity.sparsify(model, examples, 0, 2, 0.5, "magnitude")
    assert (model.model.layers[0].mlp.down_proj.weight[:, 0] == 0).all()


def test_sparsity_stage_says_dense_runtimes_gain_nothing_and_distill_keeps_the_zeros(tuned_art, data_art, tmp_path):
    from edgeft.stages import distill

    art = prune.run(tuned_art, prune.Config(sparsity=0.5, calib_samples=8, max_length=64, dtype="float32"),
                    tmp_path / "prune", data=data_art)
    m = art.metrics
    assert m["sparsity"] == 0.5 and m["params_after"] == m["params_before"]
    assert "gain no speed" in m["dense_runtime_note"] and m["eval_loss_after"] is not None
    zeros = lambda model: int(sum((mod.weight == 0).sum() for n, mod in model.named_modules()  # noqa: E731
                                  if isinstance(mod, torch.nn.Linear) and ".layers." in f".{n}."))
    before = zeros(_load(art.path))
    assert before > 0
    out = distill.run(art, distill.Config(max_steps=4, batch_size=4, lr=3e-3, max_length=64, eval_samples=4,
                                          dtype="float32"), tmp_path / "distill", data=data_art, teacher=tuned_art)
    student = _load(out.path)
    assert zeros(student) == before  # masked gradients: Adam and weight decay never move a zero
    assert not torch.equal(student.lm_head.weight, _load(art.path).lm_head.weight)  # the rest did train


@pytest.mark.parametrize("bad", [{"sparsity": 0.95}, {"sparsity": -0.1}, {"sparsity_method": "sparsegpt"}])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(UserError, match="prune.sparsity"):
        prune.validate(prune.Config(**bad))


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_q_k_norm_families_prune_heads_and_channels_exactly(family_dirs, tiny_qa_jsonl, tmp_path, family):
    """Dropping a KV group (with its query heads) and MLP channels equals zeroing their o_proj / down_proj
    columns in the full model: the per-head q/k norms (one head_dim vector) must survive unsliced, and Gemma 3's
    pre/post norms and layer types must follow their blocks."""
    from transformers import AutoModelForCausalLM

    model_dir = family_dirs(family)
    model = _load(model_dir)
    calib = _examples(model_dir, tiny_qa_jsonl, 8)
    imp = prune.importance(model, calib, 0, 4)
    ids = torch.tensor([calib[0][0]])
    same = prune.prune_model(model, prune.make_plan(model, imp, prune.current_sizes(model)))
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)
    sizes = {**prune.current_sizes(model), "kv_groups": 1, "intermediate_size": 256}
    plan = prune.make_plan(model, imp, sizes)
    small = prune.prune_model(model, plan)
    d = model.config.head_dim  # 128, not hidden / heads = 64
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            dropped_group = 1 - plan["kv"][i][0]  # 2 groups of 2 query heads
            layer.self_attn.o_proj.weight[:, dropped_group * 2 * d:(dropped_group + 1) * 2 * d] = 0
            dropped = sorted(set(range(640)) - set(plan["ffn"][i]))
            layer.mlp.down_proj.weight[:, dropped] = 0
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.config.head_dim == d and again.model.layers[0].self_attn.q_norm.weight.shape == (d,)
    assert prune.n_params(again) == prune.count_params({n: tuple(p.shape) for n, p in model.state_dict().items()},
                                                       model.config, sizes)
    if family == "gemma3_text":  # depth keeps each kept block's attention kind
        one = prune.prune_model(model, prune.make_plan(model, imp, {**sizes, "layers": 1}))
        assert one.config.layer_types == [model.config.layer_types[prune.make_plan(
            model, imp, {**sizes, "layers": 1})["layers"][0]]]


def test_gemma3_hidden_width_and_unknown_families_are_refused_with_the_list(family_dirs):
    with pytest.raises(UserError, match=r"sqrt\(hidden_size\).*prune.hidden_size=0"):
        prune.check_model("gemma3_text", prune.Config(hidden_size=128))
    with pytest.raises(UserError, match="leave 'hidden' out of prune.axes"):
        prune.check_model("gemma3_text", prune.Config(ratio=0.3, axes="depth,hidden"))
    prune.check_model("gemma3_text", prune.Config(ratio=0.3))  # the default axes: depth, mlp, heads
    with pytest.raises(UserError, match="model_type 'phi3' is not supported; supported: llama, mistral, qwen2, "
                                        "qwen3, gemma3_text"):
        prune.check_model("phi3", prune.Config(layers=1))
