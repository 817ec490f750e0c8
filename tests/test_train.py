"""foxlab.train: schedule and optimizer groups, exact resume, Ctrl-C, atomic checkpoints, DDP, transformers.Trainer,
and the boundary-forgetting measure."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import foxlab
import foxlab.train
from foxlab.data import RESET_ID, ByteTokenizer, TaskDataset, make_task
from foxlab.model import ForgettingTransformerForCausalLM
from foxlab.parallel import load_optimizer_state, optimizer_state
from foxlab.train import (boundary_forget_ratio, find_checkpoint, lr_factor, make_optimizer, save_checkpoint,
                          train)

ROOT = Path(__file__).resolve().parents[1]
# A model of a few thousand parameters and short sequences: every run here takes about a second.
SMALL = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, intermediate_size=64)
RUN = dict(overrides=SMALL, task="segments", seq_len=32, batch_size=4, steps=8, lr=3e-3, eval_every=3,
           eval_batches=1, seed=0, progress=False, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return train(out=out, **RUN)


def stop_at(step_to_stop, how="raise"):
    def callback(step, loss):
        if step == step_to_stop:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does: the handler lets the step finish
    return callback


def test_schedule_and_weight_decay_groups():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # then non-increasing
    assert factors[-1] == pytest.approx(0.1, abs=1e-3) and factors[55] == pytest.approx(0.55, abs=0.03)
    model = ForgettingTransformerForCausalLM(foxlab.ForgettingTransformerConfig.from_preset("tiny", **SMALL))
    decay, no_decay = make_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("fgate.bias") for p in no_decay["params"])  # the gate bias: no decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_training_learns_and_writes_metrics(uninterrupted, tmp_path):
    r = uninterrupted
    assert r.step == 8 and len(r.losses) == len(r.lrs) == 8 and not r.interrupted
    assert r.losses[-1] < r.losses[0] - 0.5  # from ~log(260) towards the task's loss
    assert [e["step"] for e in r.evals] == [3, 6, 8] and all(math.isfinite(e["loss"]) for e in r.evals)
    metrics = json.loads((r.out / "metrics.json").read_text())
    assert metrics["losses"] == r.losses and metrics["step"] == 8 and metrics["final_loss"] == r.losses[-1]
    ckpt = find_checkpoint(r.out)
    assert ckpt == r.out / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert type(tok) is ByteTokenizer
    for name, p in model.state_dict().items():
        assert torch.equal(p, r.model.state_dict()[name].cpu()), name


def test_metrics_json_follows_training(tmp_path, monkeypatch):
    """metrics.json holds every loss so far while the run is going (here rewritten after every step)."""
    monkeypatch.setattr(foxlab.train, "METRICS_EVERY_S", 0.0)
    seen = []

    def peek(step, loss):
        if step > 1:
            seen.append(len(json.loads((tmp_path / "metrics.json").read_text())["losses"]))

    train(out=tmp_path, callback=peek, **{**RUN, "steps": 5, "eval_every": None})
    assert seen == [1, 2, 3, 4]  # at step k's callback, the file has the k - 1 losses written after step k - 1


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_ctrl_c_saves_and_resume_is_exact(uninterrupted, tmp_path, how):
    """Interrupted at step 5 (after a periodic save at step 3): a checkpoint at step 5, and the resumed run's
    losses and evaluations equal the uninterrupted run's exactly."""
    first = train(out=tmp_path, save_every=3, callback=stop_at(5, how), **RUN)
    assert first.interrupted and first.step == 5 and first.losses == uninterrupted.losses[:5]
    info = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert info["step"] == 5 and info["samples_seen"] == 5 * RUN["batch_size"]
    assert len(json.loads((tmp_path / "metrics.json").read_text())["losses"]) == 5
    resumed = train(out=tmp_path, resume=True, **RUN)
    assert resumed.step == 8 and not resumed.interrupted
    assert resumed.losses == uninterrupted.losses  # bitwise
    assert resumed.evals == uninterrupted.evals
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == uninterrupted.losses
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, uninterrupted.model.state_dict()[name]), name


def test_resume_refuses_different_settings(uninterrupted, tmp_path):
    train(out=tmp_path, **{**RUN, "steps": 2})
    with pytest.raises(ValueError, match="batch_size"):
        train(out=tmp_path, resume=True, **{**RUN, "batch_size": 8})
    with pytest.raises(ValueError, match="overrides"):
        train(out=tmp_path, resume=True, **{**RUN, "overrides": {**SMALL, "num_hidden_layers": 3}})
    with pytest.raises(FileNotFoundError):
        train(out=tmp_path / "empty", resume=True, **RUN)


def test_crash_mid_save_keeps_last_good_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """save_pretrained dies after writing part of the weights at the step-6 save: the step-3 checkpoint stays
    complete and loadable, no temporary folder is left behind, and resuming from it reproduces the run."""
    real_save = ForgettingTransformerForCausalLM.save_pretrained
    calls = []

    def crashing_save(self, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            (Path(folder) / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(ForgettingTransformerForCausalLM, "save_pretrained", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        train(out=tmp_path, save_every=3, **RUN)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".checkpoint-tmp-*"))
    ckpt = find_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    AutoModelForCausalLM.from_pretrained(ckpt)  # loads
    resumed = train(out=tmp_path, resume=True, **RUN)
    assert resumed.losses == uninterrupted.losses


def test_crash_between_renames_is_recovered(uninterrupted, tmp_path):
    """A save that died after moving the old checkpoint aside but before moving the new one in leaves only
    checkpoint.prev: resume finds it, and the next save cleans up."""
    train(out=tmp_path, **{**RUN, "steps": 3})
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.prev")
    (tmp_path / ".checkpoint-tmp-dead").mkdir()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.prev"
    resumed = train(out=tmp_path, resume=True, **RUN)  # the schedule is for 8 steps: a different run from step 3
    assert resumed.step == 8 and len(resumed.losses) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.json"]


def test_save_checkpoint_replaces_atomically(uninterrupted, tmp_path):
    model, tok = uninterrupted.model, uninterrupted.tokenizer
    save_checkpoint(tmp_path, model, tok, {"step": 1}, {"step": 1})
    save_checkpoint(tmp_path, model, tok, {"step": 2}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def assert_same_run(losses, evals, model, reference, what):
    """Losses and evaluations as the one-process run's, up to float32 rounding (the gradients of a global batch
    are summed in another order), and the same final weights up to Adam's amplification of that rounding."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what}: {m}")
    assert [e["step"] for e in evals] == [e["step"] for e in reference.evals], what
    torch.testing.assert_close(torch.tensor([e["loss"] for e in evals]),
                               torch.tensor([e["loss"] for e in reference.evals]), rtol=1e-5, atol=1e-6)
    reference_weights = reference.model.state_dict()
    for name, p in model.state_dict().items():
        # Adam turns float noise in near-zero gradients into up to ~lr-sized steps: compare well below lr (3e-3)
        torch.testing.assert_close(p, reference_weights[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_ddp_and_fsdp_two_processes_match_one(uninterrupted, tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 4 = 2 x 2, against one process with batch 4: the command
    line with DDP; FSDP stopped at step 5 and resumed by one process; a one-process checkpoint resumed by FSDP."""
    train(out=tmp_path / "one", callback=stop_at(4), **RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed_runs.py"), str(tmp_path), json.dumps(RUN)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its processes (a SIGKILL would leave them running)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the distributed runs took over 300 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]

    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli["run"]["world_size"] == 2 and cli["run"]["parallel"] == "ddp"
    assert_same_run(cli["losses"], cli["evals"], AutoModelForCausalLM.from_pretrained(tmp_path / "cli" / "checkpoint"),
                    uninterrupted, "DDP")

    stopped = json.loads((tmp_path / "fsdp" / "checkpoint" / "trainer_state.json").read_text())
    assert stopped["step"] == 5 and stopped["run"]["parallel"] == "fsdp"
    config = json.loads((tmp_path / "fsdp" / "checkpoint" / "config.json").read_text())
    assert config["architectures"] == ["ForgettingTransformerForCausalLM"]  # a plain model's folder, not FSDP's
    finished = train(out=tmp_path / "fsdp", resume=True, **RUN)  # one process continues the 2-process FSDP run
    assert_same_run(finished.losses, finished.evals, finished.model, uninterrupted, "FSDP, then one process")

    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["run"]["world_size"] == 2 and resumed["losses"][:4] == uninterrupted.losses[:4]
    assert_same_run(resumed["losses"], resumed["evals"],
                    AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoint"), uninterrupted,
                    "one process, then FSDP")


def test_optimizer_state_round_trips_by_parameter_name():
    """What checkpoints hold (keyed by name, any number of processes), format-1 states (keyed by index), and the
    state before any step all load back into a fresh optimizer exactly."""
    torch.manual_seed(0)
    model = ForgettingTransformerForCausalLM(foxlab.ForgettingTransformerConfig.from_preset("tiny", **SMALL))
    optimizer = make_optimizer(model, 1e-3, 0.1)
    assert optimizer_state(model, optimizer)["state"] == {}
    ids = torch.randint(4, 260, (2, 16))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    by_name = optimizer_state(model, optimizer)
    assert "model.layers.0.attn.fgate.proj.weight" in by_name["state"]
    expected = optimizer.state_dict()
    for saved in (by_name, optimizer.state_dict(), {"state": {}, "param_groups": []}):
        fresh = make_optimizer(model, 1e-3, 0.1)
        load_optimizer_state(model, fresh, saved)
        if not saved["state"]:
            assert fresh.state_dict()["state"] == {}
            continue
        loaded = fresh.state_dict()
        for group in loaded["param_groups"]:
            group["betas"] = tuple(group["betas"])  # torch.distributed.checkpoint gives lists (AdamW takes both)
        assert loaded["param_groups"] == expected["param_groups"]
        for index, moments in expected["state"].items():
            for key, value in moments.items():
                assert torch.equal(loaded["state"][index][key], value), (index, key)


def test_unknown_parallel_mode_is_refused():
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp, got 'zero3'"):
        train(**{**RUN, "parallel": "zero3"})


def test_transformers_trainer_trains_the_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = ForgettingTransformerForCausalLM(foxlab.ForgettingTransformerConfig.from_preset("tiny", **SMALL))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    dataset = TaskDataset(make_task("segments", seq_len=32, seed=0), num_samples=24)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.3
    assert trainer.state.global_step == 6
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.layers.0.attn.fgate.proj.weight" in changed and len(changed) == len(before)


def test_boundary_forget_ratio_finds_the_forgetting_head():
    """A hand-built layer-0 gate that closes on <reset> (and stays open elsewhere) in head 1 only."""
    torch.manual_seed(0)
    model = ForgettingTransformerForCausalLM(foxlab.ForgettingTransformerConfig.from_preset("tiny", **SMALL)).eval()
    C = SMALL["hidden_size"]
    u = torch.zeros(C)
    u[0] = 1.0
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0  # no token but <reset> has a component along u
        emb[RESET_ID] = u
        gate = model.model.layers[0].attn.fgate
        gate.proj.weight.zero_()
        gate.proj.weight[1] = -5.0 * u  # head 1: logit 3 - 5 * sqrt(C) at <reset>, 3 elsewhere
        gate.bias.fill_(3.0)
    task = make_task("segments", seq_len=64, seed=0)
    ids = task.batch(0, 4)["input_ids"]
    result = boundary_forget_ratio(model, ids)
    assert (result["layer"], result["head"]) == (0, 1)
    assert result["ratio"] < 1e-6
    assert result["per_head"][0][0] == pytest.approx(1.0, abs=1e-6)  # head 0: same gate everywhere
    assert len(result["per_head"]) == 2 and all(len(row) == 2 for row in result["per_head"])
    assert result["f_other"][0][1] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-5)
