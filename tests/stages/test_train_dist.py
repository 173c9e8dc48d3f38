"""Scale-out: the train stage under `accelerate launch` with two CPU processes (gloo), end to end."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeft.constants import CKPT_SUFFIX
from edgeft.stages import data, train

REPO = Path(__file__).resolve().parents[2]
CFG = dict(method="lora", max_steps=4, batch_size=4, lr=3e-3, max_length=64, eval_samples=8, log_every=1,
           eval_every=2, save_every=2)

# Every rank runs the same script: the data stage on rank 0 first (the others find it finished), then train.
CHILD = """
import json, sys
from pathlib import Path
from edgeft.stages import data, train
from edgeft.training import dist
model, qa, out, cfg = sys.argv[1], sys.argv[2], Path(sys.argv[3]), eval(sys.argv[4])
with dist.main_first():
    d = data.run(None, data.Config(train=qa, eval=""), out / "data")
art = train.run(model, train.Config(**cfg), out / "train", data=d)
rank, world = dist.world()
(out / f"rank{rank}.json").write_text(json.dumps({"id": art.id, "world": world, "path": str(art.path)}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_equals_accumulation(cfg: dict, model_dir, qa_jsonl, tmp_path) -> None:
    """Train `cfg` under `accelerate launch` with 2 gloo processes, then in one process with grad_accum=2:
    DDP averages the two ranks' gradients, so both end with the same adapter weights and loss curve."""
    from safetensors.torch import load_file

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "--num_cpu_threads_per_process", "1", "--main_process_port", str(_port()),
           str(script), str(model_dir), str(qa_jsonl), str(out), repr(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["world"] == 2  # both ranks return the one artifact rank 0 wrote
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["steps_run"] == cfg["max_steps"]
    assert not list(out.glob(".tmp-*")) and not (out / f"train{CKPT_SUFFIX}").exists()

    d = data.run(None, data.Config(train=str(qa_jsonl), eval=""), tmp_path / "data1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        single = train.run(str(model_dir), train.Config(**{**cfg, "grad_accum": 2, "save_every": 0}),
                           tmp_path / "single", data=d)
    finally:
        torch.set_num_threads(threads)
    a = load_file(single.path / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "train" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained: B starts at zero
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert [v for _, v in single.metrics["loss_curve"]] == pytest.approx(
        [v for _, v in manifest["metrics"]["loss_curve"]], abs=1e-4)


def test_two_process_ddp_equals_one_process_with_accumulation_in_two_steps(tiny_llama_dir, tiny_qa_jsonl, tmp_path):
    """Fast half of the test below: 2 gloo processes, the 2-layer tiny Llama, 2 steps of 2 examples each."""
    cfg = dict(method="lora", max_steps=2, batch_size=2, lr=3e-3, max_length=64, eval_samples=0, log_every=1,
               save_every=0)
    _ddp_equals_accumulation(cfg, tiny_llama_dir, tiny_qa_jsonl, tmp_path)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(tiny_llama_dir, tiny_qa_jsonl, tmp_path):
    _ddp_equals_accumulation(CFG, tiny_llama_dir, tiny_qa_jsonl, tmp_path)


@pytest.mark.slow
def test_edgeft_run_under_accelerate_launch(tmp_path):
    """`accelerate launch -m edgeft.cli run ...`: train on both ranks, rank 0 alone exports, benches and reports."""
    out, home = tmp_path / "run", tmp_path / "home"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "--num_cpu_threads_per_process", "1", "--main_process_port", str(_port()),
           "-m", "edgeft.cli", "run", "--recipe", str(REPO / "recipes/tiny.yaml"), "--profile", "tiny",
           "--out", str(out), "profile.onnx=fp32", "profile.gguf=q4_k_m", "profile.ladder=onnx:fp32,gguf:q4_k_m",
           "profile.bench_samples=4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "EDGEFT_HOME": str(home)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: ") == 1  # one report, from rank 0
    train_m = json.loads((out / "train" / "manifest.json").read_text())
    assert train_m["metrics"]["world_size"] == 2
    for d in ("data", "merge", "gguf", "onnx", "bench"):
        assert (out / d / "manifest.json").is_file(), d
    assert not list(out.glob(".tmp-*"))
