"""Train (every method) and merge (with its verification) on the tiny model, on CPU."""

import shutil

import pytest
import torch

from edgeft import artifact, data
from edgeft.errors import StageFailure, UserError
from edgeft.stages import merge, train

FAST = dict(max_steps=8, batch_size=4, lr=3e-3, max_length=64, eval_samples=8, log_every=1)


@pytest.fixture(scope="module")
def data_art(tmp_path_factory, tiny_qa_jsonl):
    return data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), tmp_path_factory.mktemp("d") / "data")


@pytest.fixture(scope="module")
def qlora_art(tmp_path_factory, tiny_llama_dir, data_art):
    return train.run(str(tiny_llama_dir), train.Config(method="qlora", **FAST),
                     tmp_path_factory.mktemp("t") / "train", data=data_art)


def test_qlora_trains_nf4_adapter(qlora_art):
    m = qlora_art.manifest
    assert qlora_art.kind == "adapter" and (qlora_art.path / "adapter" / "adapter_config.json").is_file()
    curve = m["metrics"]["loss_curve"]
    assert curve[-1][1] < curve[0][1]  # it learns
    assert m["metrics"]["trainable_params"] < m["metrics"]["total_params"] / 2
    assert (qlora_art.path / "loss.png").stat().st_size > 1000
    assert m["inputs"]["data_sha256"] and m["inputs"]["tokenizer_sha256"]


def test_qlora_merge_matches_nf4_plus_adapter(qlora_art, tmp_path):
    merged = merge.run(qlora_art, merge.Config(dtype="float32"), tmp_path / "merged")
    mt = merged.metrics
    assert mt["from_qlora"] and mt["dequantized_nf4_tensors"] == 14  # 7 linears x 2 layers
    assert mt["merge_max_abs_diff"] <= 1e-4 and mt["change_vs_base"] > 1e-3
    assert merged.manifest["parent"]["id"] == qlora_art.id


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_other_methods(method, tiny_llama_dir, data_art, tmp_path):
    extra = {"use_dora": True} if method == "lora" else {"freeze_last_n": 1} if method == "freeze" else {}
    art = train.run(str(tiny_llama_dir), train.Config(method=method, **FAST, **extra), tmp_path / "t", data=data_art)
    assert art.kind == ("adapter" if method == "lora" else "hf")
    if method == "freeze":  # layer 0 and the embeddings did not move
        from safetensors.torch import load_file
        before, after = load_file(tiny_llama_dir / "model.safetensors"), load_file(art.path / "model.safetensors")
        assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
        assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    if method == "lora":
        m = merge.run(art, merge.Config(), tmp_path / "m")
        assert m.metrics["merge_max_abs_diff"] <= 1e-4


def test_same_seed_same_weights(tiny_llama_dir, data_art, tmp_path):
    cfg = train.Config(method="full", **FAST)
    a = train.run(str(tiny_llama_dir), cfg, tmp_path / "a", data=data_art)
    b = train.run(str(tiny_llama_dir), cfg, tmp_path / "b", data=data_art)
    assert a.manifest["files"]["model.safetensors"] == b.manifest["files"]["model.safetensors"]


def test_merge_refuses_an_adapter_that_changed_nothing(qlora_art, tmp_path):
    fake = tmp_path / "zero"
    shutil.copytree(qlora_art.path, fake)
    from safetensors.torch import load_file, save_file
    f = fake / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(f).items()}, f)
    (fake / "manifest.json").unlink()
    art = artifact.build(tmp_path / "zero-art", kind="adapter", stage="train", params=qlora_art.manifest["params"],
                         parent=None, inputs=qlora_art.manifest["inputs"],
                         payload=lambda d: shutil.copytree(fake, d, dirs_exist_ok=True) and None)
    with pytest.raises(StageFailure, match="equals the base"):
        merge.run(art, merge.Config(), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cpu_refuses_cuda_only_options(tiny_llama_dir, data_art, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="paged_adamw_8bit needs CUDA"):
        train.run(str(tiny_llama_dir), train.Config(optim="paged_adamw_8bit"), tmp_path / "t", data=data_art)
    with pytest.raises(UserError, match="float16 needs CUDA"):
        train.run(str(tiny_llama_dir), train.Config(compute_dtype="float16"), tmp_path / "t", data=data_art)
    assert not (tmp_path / "t").exists()


@pytest.mark.gpu
def test_qlora_on_cuda_end_to_end(tiny_llama_dir, data_art, tmp_path):
    art = train.run(str(tiny_llama_dir), train.Config(method="qlora", device="cuda", compute_dtype="bfloat16",
                                                      optim="paged_adamw_8bit", **FAST), tmp_path / "t", data=data_art)
    assert art.metrics["peak_cuda_mb"] > 0
    m = merge.run(art, merge.Config(), tmp_path / "m")
    assert m.metrics["change_vs_base"] > 1e-3


def test_packing_eval_curve_and_plot_through_the_stage(tiny_llama_dir, data_art, tmp_path):
    cfg = train.Config(method="lora", packing=True, eval_every=4, **FAST)
    art = train.run(str(tiny_llama_dir), cfg, tmp_path / "t", data=data_art)
    m = art.metrics
    assert m["packing"] and [s for s, _ in m["eval_curve"]] == [4, 8] and m["eval_loss"] == m["eval_curve"][-1][1]
    assert m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 0 and m["train_loss"] < m["loss_curve"][0][1]
    assert (art.path / "loss.png").stat().st_size > 1000
    merged = merge.run(art, merge.Config(), tmp_path / "m")  # the adapter works outside the packed loop
    assert merged.metrics["merge_max_abs_diff"] <= 1e-4


def test_refuses_early_stopping_without_evals(tiny_llama_dir, data_art, tmp_path):
    with pytest.raises(UserError, match="early_stop_patience needs train.eval_every"):
        train.run(str(tiny_llama_dir), train.Config(early_stop_patience=2), tmp_path / "t", data=data_art)
    with pytest.raises(UserError, match="save_every"):
        train.run(str(tiny_llama_dir), train.Config(save_every=-1), tmp_path / "t", data=data_art)
    assert not (tmp_path / "t").exists()
