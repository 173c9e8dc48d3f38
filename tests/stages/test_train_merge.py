"""Train (every method) and merge (with its verification) on the tiny model: on CPU (device pinned, so a GPU
host runs the same checks), and on CUDA in the tests marked gpu."""

import shutil

import pytest
import torch

from edgeft import artifact, host
from edgeft.errors import StageFailure, UserError
from edgeft.stages import data, merge, train
from edgeft.training import merging, nf4

FAST = dict(max_steps=8, batch_size=4, lr=3e-3, max_length=64, eval_samples=8, log_every=1, device="cpu")


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


def test_a_cuda_trained_qlora_adapter_merged_without_cuda_says_whose_nf4_it_used(qlora_art, tmp_path, capsys):
    """bitsandbytes' CPU and CUDA quantizers give different NF4 block scales: an adapter trained on a CUDA-quantized
    base, merged where no CUDA device is visible, is merged into the CPU's weights, with a warning and both devices
    in the manifest (on a CUDA host merge quantizes on CUDA again: test_qlora_on_cuda_end_to_end)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the base is quantized on CUDA again")

    def as_if_trained_on_cuda(d):
        shutil.copytree(qlora_art.path, d, dirs_exist_ok=True)
        (d / "manifest.json").unlink()
        return {**qlora_art.metrics, "device": "cuda"}

    art = artifact.build(tmp_path / "cuda-art", kind="adapter", stage="train", params=qlora_art.manifest["params"],
                         parent=None, inputs=qlora_art.manifest["inputs"], payload=as_if_trained_on_cuda)
    m = merge.run(art, merge.Config(dtype="float32"), tmp_path / "m").metrics
    assert m["nf4_trained_on"] == "cuda" and m["nf4_quantized_on"] == "cpu" and m["merge_rel_diff"] <= 1e-4
    err = capsys.readouterr().err
    assert "trained on a cuda-quantized NF4 base" in err and "merge on a CUDA host" in err
    own = merge.run(qlora_art, merge.Config(dtype="float32"), tmp_path / "own").metrics
    assert own["nf4_trained_on"] == own["nf4_quantized_on"] == "cpu"
    assert "warning" not in capsys.readouterr().err


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
    cfg = {**FAST, "device": "cuda", "compute_dtype": "bfloat16", "optim": "paged_adamw_8bit"}
    art = train.run(str(tiny_llama_dir), train.Config(method="qlora", **cfg), tmp_path / "t", data=data_art)
    assert art.metrics["peak_cuda_mb"] > 0 and art.metrics["device"].startswith("cuda")
    assert art.metrics["numerics"]["nf4_kernel"] == nf4.KERNEL_CUDA
    m = merge.run(art, merge.Config(), tmp_path / "m").metrics
    assert m["change_vs_base"] > 1e-3 and m["merge_rel_diff"] <= 1e-4
    assert m["nf4_trained_on"] == m["nf4_quantized_on"] == "cuda" and m["nf4_kernel"] == nf4.KERNEL_CUDA


@pytest.mark.gpu
def test_lora_on_cuda_trains_what_the_cpu_run_trains(tiny_llama_dir, data_art, tmp_path):
    """fp32 LoRA on CUDA and on CPU, same seed and data: the same first loss (the adapter starts at zero) and
    loss curves that stay together; the CUDA adapter merges through the same check."""
    arts = {d: train.run(str(tiny_llama_dir), train.Config(method="lora", **{**FAST, "device": d}), tmp_path / d,
                         data=data_art) for d in ("cpu", "cuda")}
    cpu, gpu = ([loss for _, loss in arts[d].metrics["loss_curve"]] for d in ("cpu", "cuda"))
    print("loss cpu", cpu, "cuda", gpu)
    assert len(cpu) == len(gpu) and abs(cpu[0] - gpu[0]) <= 1e-4
    assert max(abs(a - b) for a, b in zip(cpu, gpu)) <= 2e-2 and gpu[-1] < gpu[0]
    assert arts["cuda"].metrics["peak_cuda_mb"] > 0 and arts["cpu"].metrics["peak_cuda_mb"] is None
    assert merge.run(arts["cuda"], merge.Config(), tmp_path / "m").metrics["merge_rel_diff"] <= 1e-4


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


# QLoRA numerics on either CPU family: bitsandbytes' fused bf16 kernel (AVX512-BF16 hosts) and its
# dequantize path. Where this host lacks AVX512-BF16 the fused path is simulated (bf16 activations and
# weights, as the kernel computes), so both paths are proven on every host.

@pytest.fixture(params=["dequant", "fused-bf16"])
def kernel(request, monkeypatch):
    """Make bitsandbytes take one 4-bit inference path for layers built from here on."""
    import bitsandbytes.nn.modules as M

    if request.param == "dequant":
        monkeypatch.setattr(M, "has_avx512bf16", lambda: False)  # what Linear4bit.__init__ asks
    elif not nf4.fused_kernel_available():
        monkeypatch.setattr(M, "has_avx512bf16", lambda: True)
        real = M.Linear4bit.forward

        def fused_bf16(self, x):  # the kernel's numerics: bf16 activations times bf16 weights
            if self.support_avx512bf16_for_cpu and not self.training and not x.requires_grad:
                w = nf4.dequantized_weight(self).to(torch.bfloat16)
                bias = None if self.bias is None else self.bias.to(torch.bfloat16)
                return torch.nn.functional.linear(x.to(torch.bfloat16), w, bias).to(x.dtype)
            return real(self, x)

        monkeypatch.setattr(M.Linear4bit, "forward", fused_bf16)
    return request.param


def test_merge_passes_and_names_the_kernel_on_either_path(kernel, qlora_art, tmp_path):
    m = merge.run(qlora_art, merge.Config(dtype="float32"), tmp_path / "merged").metrics
    assert m["merge_rel_diff"] <= 1e-4 and m["merge_top1_agreement"] == 1.0 and m["merge_kl"] <= 1e-6
    if kernel == "fused-bf16":
        assert m["nf4_kernel"] == nf4.KERNEL_FUSED_BF16 and m["nf4_kernel_activation_dtype"] == "bfloat16"
        assert m["nf4_kernel_rel_diff"] > 1e-4  # bf16 activations: measurably off fp32, and said so
    else:
        assert m["nf4_kernel"] == nf4.KERNEL_DEQUANT and m["nf4_kernel_activation_dtype"] == "float32"
        assert m["nf4_kernel_rel_diff"] <= 1e-4 and m["nf4_kernel_top1_agreement"] == 1.0


def _lora_grads(model, batch) -> dict:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_after_an_eval_pass_sees_the_same_weights(kernel, tiny_llama_dir):
    """An eval pass (no grad) must not change what the next training step computes (the fused kernel
    repacks weights in place on its first call; training pins every layer to the dequantize path)."""
    cfg = train.Config(method="qlora", **FAST)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    grads = []
    for eval_first in (False, True):
        torch.manual_seed(0)
        model, numerics = train._load_model(tiny_llama_dir, cfg, torch.device("cpu"))
        assert numerics["compute_dtype_honoured"] and numerics["nf4_kernel"] == nf4.KERNEL_DEQUANT
        assert numerics["fused_bf16_kernel_disabled"] == (kernel == "fused-bf16")
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        grads.append(_lora_grads(model, batch))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not nf4.fused_kernel_available(), reason="the real fused kernel exists on AVX512-BF16 hosts only")
def test_unpinned_bitsandbytes_repacks_weights_on_eval(tiny_llama_dir):
    """Why training pins the layers: left alone, one eval pass repacks every 4-bit weight for the
    inference kernel, and the repacked layers keep that kernel in training mode too."""
    from transformers import AutoModelForCausalLM

    from edgeft.training import hf_io

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_io.bnb_config(
        "nf4", True, torch.float32), dtype=torch.float32, device_map={"": "cpu"})
    assert nf4.host_kernel(model, torch.float32) == {
        "kernel": nf4.KERNEL_FUSED_BF16, "activation_dtype": "bfloat16", "compute_dtype_requested": "float32",
        "compute_dtype_honoured": False}
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9]]))
    assert all(m.weight.quant_state.packing_format_for_cpu for m in nf4.linear4bit_layers(model))
    with pytest.raises(RuntimeError, match="repacked"):
        nf4.dequantized_weight(nf4.linear4bit_layers(model)[0])


def test_train_manifest_records_host_and_numerics(qlora_art):
    m = qlora_art.manifest["metrics"]
    assert m["host"]["cpu"] == host.cpu_model() and m["host"]["isa"] == host.describe()["isa"]
    num = m["numerics"]
    assert num["compute_dtype_requested"] == "float32" and num["compute_dtype_honoured"]
    assert num["nf4_kernel"] == nf4.KERNEL_DEQUANT and num["nf4_layers"] == 14
    assert num["fused_bf16_kernel_available"] == nf4.fused_kernel_available()
    assert len(qlora_art.manifest["inputs"]["base_weights_sha256"]) == 64


def test_merge_refuses_another_base(tiny_llama_dir, data_art, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    art = train.run(str(base), train.Config(method="lora", **FAST), tmp_path / "t", data=data_art)
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01  # someone "updated" the base
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StageFailure, match="not the one the adapter was trained on"):
        merge.run(art, merge.Config(), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_catches_a_wrong_merge(monkeypatch, tiny_llama_dir, data_art, tmp_path):
    """A merge that applies the adapter at the wrong scale fails the check (relative, top-1 and KL)."""
    from peft.tuners.lora import LoraModel

    art = train.run(str(tiny_llama_dir), train.Config(method="lora", **FAST), tmp_path / "t", data=data_art)
    real = LoraModel.merge_and_unload

    def twice(self, *a, **k):
        for n, p in self.named_parameters():
            if "lora_B" in n:
                p.data.mul_(2.0)
        return real(self, *a, **k)

    monkeypatch.setattr(LoraModel, "merge_and_unload", twice)
    with pytest.raises(StageFailure, match="the merge is wrong"):
        merge.run(art, merge.Config(), tmp_path / "m")


def test_compare_logits_is_relative_to_scale_and_tie_aware():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 50, generator=g) * 30  # a real model's logit scale (~20-100)
    noisy = ref * (1 + 1e-6 * torch.randn(6, 50, generator=g))  # fp32 reassociation-sized noise
    c = merging.compare_logits(ref, noisy)
    assert c["max_abs_diff"] > 1e-5 and c["rel_diff"] < 1e-5 and c["decisive_mismatches"] == 0
    tie = ref.clone()
    top = tie[0].argmax()
    second = tie[0].topk(2).indices[1]
    tie[0, second] = tie[0, top] - 1e-7  # a near-tie the noise may flip: not decisive
    flipped = tie.clone()
    flipped[0, second] = tie[0, top] + 1e-7
    assert merging.compare_logits(tie, flipped)["decisive_mismatches"] == 0
    wrong = ref.clone()
    wrong[1, ref[1].argmin()] = ref[1].max() + 5  # a confident different answer
    c = merging.compare_logits(ref, wrong)
    assert c["decisive_mismatches"] == 0 or c["rel_diff"] > 1e-2  # caught by scale either way
    assert c["rel_diff"] > 1e-2 and c["kl_mean"] > 1e-3
