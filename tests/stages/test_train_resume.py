"""Checkpoints: a run killed with SIGKILL and rerun resumes and ends with the same weights, bit for bit."""

import json
import os
import subprocess
import sys

import pytest
import torch

from edgeft.constants import CKPT_SUFFIX
from edgeft.stages import data, train
from edgeft.training import checkpoint

CFG = dict(method="lora", lora_dropout=0.1, max_steps=12, save_every=3, eval_every=4, batch_size=4, lr=3e-3,
           max_length=64, eval_samples=8, log_every=1)

# The child trains; with a kill step it SIGKILLs itself just before that optimizer step (no cleanup runs).
CHILD = """
import os, signal, sys, torch
from edgeft import artifact
from edgeft.stages import train
model, data_dir, out, kill_at, cfg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), eval(sys.argv[5])
if kill_at:
    step, calls = torch.optim.AdamW.step, [0]
    def counting(self, *a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)
    torch.optim.AdamW.step = counting
train.run(model, train.Config(**cfg), out, data=artifact.load(data_dir))
"""


@pytest.fixture(scope="module")
def data_art(tmp_path_factory, tiny_qa_jsonl):
    return data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), tmp_path_factory.mktemp("d") / "data")


def _child(model, data_art, out, kill_at, cfg=CFG, env=None):
    env = {**os.environ, "PYTHONPATH": str(train.Path(train.__file__).parents[2]), **(env or {})}
    return subprocess.run([sys.executable, "-c", CHILD, str(model), str(data_art.path), str(out), str(kill_at),
                           repr(cfg)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ref(tiny_llama_dir, data_art, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "train"
    art = train.run(str(tiny_llama_dir), train.Config(**CFG), out, data=data_art)
    assert not out.with_name(f"train{CKPT_SUFFIX}").exists()  # checkpoints go once the artifact is finished
    return art


def _same_run(ref, out, resumed: int = 6, steps: int = 12):
    from safetensors.torch import load_file

    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == resumed and metrics["steps_run"] == steps
    assert metrics["loss_curve"] == json.loads(json.dumps(ref.metrics["loss_curve"]))
    assert metrics["eval_curve"] == json.loads(json.dumps(ref.metrics["eval_curve"]))
    a = load_file(ref.path / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not out.with_name(out.name + CKPT_SUFFIX).exists()


class Interrupted(Exception):
    pass


def test_resume_after_interruption_in_process(tiny_llama_dir, data_art, ref, tmp_path, monkeypatch):
    step, calls = torch.optim.AdamW.step, [0]

    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] == 8:
            raise Interrupted
        return step(self, *a, **k)

    out = tmp_path / "t"
    monkeypatch.setattr(torch.optim.AdamW, "step", failing)
    with pytest.raises(Interrupted):
        train.run(str(tiny_llama_dir), train.Config(**CFG), out, data=data_art)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert not out.exists() and checkpoint.latest(tmp_path / f"t{CKPT_SUFFIX}").name == "step-6"
    train.run(str(tiny_llama_dir), train.Config(**CFG), out, data=data_art)
    _same_run(ref, out)


# the fast kill test: 6 steps, checkpoints at 2 and 4, killed before step 5; one torch thread in every
# process (the same reduction order everywhere, and no spinning second thread on a busy 2-core box)
FAST = dict(CFG, max_steps=6, save_every=2, eval_every=3)


def test_resume_in_process_after_a_sigkilled_child_matches_uninterrupted_run(tiny_llama_dir, data_art, tmp_path,
                                                                             monkeypatch):
    """Fast half of the test below: a child SIGKILLed before its 5th optimizer step (no cleanup, no finally),
    then the rerun, here, resumes from its step-4 checkpoint and ends bit-identical to an uninterrupted run."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train.run(str(tiny_llama_dir), train.Config(**FAST), tmp_path / "ref" / "train", data=data_art)
        out = tmp_path / "killed"
        first = _child(tiny_llama_dir, data_art, out, kill_at=5, cfg=FAST, env={"OMP_NUM_THREADS": "1"})
        assert first.returncode == -9, first.stderr[-2000:]
        assert not (out / "manifest.json").exists()
        ckpt = checkpoint.latest(tmp_path / f"killed{CKPT_SUFFIX}")
        assert ckpt is not None and ckpt.name == "step-4"
        train.run(str(tiny_llama_dir), train.Config(**FAST), out, data=data_art)
    finally:
        torch.set_num_threads(threads)
    _same_run(ref, out, resumed=4, steps=6)
    assert not list(tmp_path.glob(".tmp-killed-*"))


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_llama_dir, data_art, ref, tmp_path):

    out = tmp_path / "killed"
    first = _child(tiny_llama_dir, data_art, out, kill_at=8)
    assert first.returncode == -9, first.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    ckpt = checkpoint.latest(tmp_path / f"killed{CKPT_SUFFIX}")
    assert ckpt is not None and ckpt.name == "step-6"  # saved at 3 and 6, killed before step 8

    second = _child(tiny_llama_dir, data_art, out, kill_at=0)
    assert second.returncode == 0, second.stderr[-2000:]
    _same_run(ref, out)
    assert not list(tmp_path.glob(".tmp-killed-*"))  # the killed run's staging dir is cleaned up too


def test_checkpoints_of_other_params_are_not_resumed(tmp_path):
    root = tmp_path / f"t{CKPT_SUFFIX}"
    checkpoint.prepare(root, "aaaa")
    (root / "step-3").mkdir()
    (root / "step-3" / "state.json").write_text("{}")
    assert checkpoint.latest(root).name == "step-3"
    checkpoint.prepare(root, "bbbb")  # another artifact id: the stale checkpoint is dropped
    assert checkpoint.latest(root) is None
