"""foxlab.train: schedule and optimizer groups, exact resume, Ctrl-C, atomic checkpoints, DDP, transformers.Trainer,
and the boundary-forgetting measure."""

import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import foxlab
import foxlab.train
from foxlab.data import RESET_ID, ByteTokenizer, TaskDataset, make_task
from foxlab.model import ForgettingTransformerForCausalLM
from foxlab.parallel import load_optimizer_state, optimizer_state
from foxlab.settings import SettingError
from foxlab.train import (TRAIN_SETTINGS, ResumeMismatch, boundary_forget_ratio, find_checkpoint, load_checkpoint,
                          lr_factor, make_optimizer, save_checkpoint, train)

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
    with pytest.raises(ValueError, match="overrides\\['num_hidden_layers'\\] is 3 here but 2"):
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
    with pytest.raises(SettingError, match="parallel must be one of 'ddp', 'fsdp', got 'zero3'"):
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


# --- every argument of train() is checked (foxlab.settings) ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_clip=-1.0), r"grad_clip must be a number >= 0 or None, got -1.0"),
    (dict(eval_batches=0), r"eval_batches must be an integer >= 1, got 0"),
    (dict(min_lr_ratio=-2), r"min_lr_ratio must be a number in \[0, 1\], got -2"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be a number in \[0, 1\]"),
    (dict(warmup_steps=-3), r"warmup_steps must be an integer >= 0 or None, got -3"),
    (dict(warmup_steps=20), r"warmup_steps \(20\) must be at most steps \(8\)"),
    (dict(lr=0), r"lr must be a number > 0, got 0"),
    (dict(lr="3e-3"), r"lr must be a number > 0, got '3e-3' \(a str\)"),
    (dict(steps=0), r"steps must be an integer >= 1, got 0"),
    (dict(steps=2.5), r"steps must be an integer >= 1, got 2.5 \(a float\)"),
    (dict(batch_size=True), r"batch_size must be an integer >= 1, got True \(a bool\)"),
    (dict(seq_len=0), r"seq_len must be an integer >= 1 or None"),
    (dict(seq_len=4), r"task 'segments': seq_len must be an integer >= 8, got 4"),
    (dict(task_kwargs=dict(alphabet=3)), r"task 'segments': unknown setting 'alphabet'; did you mean 'alphabet_size'"),
    (dict(betas=(0.9, 1.0)), r"betas must be a list of 2 numbers, each in \[0, 1\)"),
    (dict(weight_decay=-0.1), r"weight_decay must be a number >= 0"),
    (dict(seed=-1), r"seed must be an integer >= 0"),
    (dict(progress="no"), r"progress must be True or False"),
    (dict(preset="tiny2"), r"preset must be one of 'tiny', .*; did you mean 'tiny'"),
    (dict(task="segment"), r"task must be one of 'segments', 'recall', 'text' or a Task, got 'segment'"),
    (dict(device="gpu"), r"device must be a torch device such as 'cpu'"),
    (dict(callback=3), r"callback must be a function callback\(step, loss\)"),
    (dict(cuda_graph=1), r"cuda_graph must be True or False"),
    (dict(cuda_graph=True), r"cuda_graph=True needs one process on a CUDA device, got device cpu"),
    (dict(overrides=dict(num_layers=3)), r"unknown setting 'num_layers'; did you mean 'num_hidden_layers'"),
    (dict(warmup=3), r"train\(\): unknown setting 'warmup'; did you mean 'warmup_steps'"),
    (dict(save_every=2), r"save_every needs an output folder"),
    (dict(model=foxlab.ForgettingTransformerConfig()), r"overrides apply to the preset's config"),
    (dict(resume="somewhere", tokenizer=ByteTokenizer()), r"resume loads the model and tokenizer"),
])
def test_train_refuses_bad_settings_by_name(kwargs, message):
    with pytest.raises(SettingError, match=message):
        train(**{**RUN, **kwargs})


def test_device_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match=r"device 'cuda' is not available: this torch .* use 'cpu'"):
        train(**{**RUN, "device": "cuda"})


def test_every_train_argument_has_a_row():
    assert set(inspect.signature(train).parameters) == set(TRAIN_SETTINGS)


# --- resuming and extending a run ---

def test_extending_a_finished_run_keeps_its_schedule_settings(tmp_path, capsys):
    """A 6-step run (warmup resolved to 1 step: 10% of 6, at least 1) extended to 10 steps: the run keeps its
    warmup, the first 6 steps are untouched, and the last 4 follow the cosine schedule of a 10-step run, from
    a learning rate higher than where the 6-step schedule ended. Not the same as a 10-step run from the start."""
    short = train(out=tmp_path, **{**RUN, "steps": 6, "eval_every": None})
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["run"]["warmup_steps"] == 1
    capsys.readouterr()
    extended = train(out=tmp_path, resume=True, **{**RUN, "steps": 10, "eval_every": None})
    assert "extending the run from 6 to 10 steps" in capsys.readouterr().out
    assert extended.step == 10 and extended.losses[:6] == short.losses and extended.lrs[:6] == short.lrs
    lr, low = RUN["lr"], 0.1
    assert extended.lrs[6:] == pytest.approx([lr * lr_factor(k, 10, 1, low) for k in range(6, 10)], rel=1e-12)
    assert extended.lrs[6] > short.lrs[5]  # the rate goes back up where the shorter schedule had decayed
    run = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["run"]
    assert (run["steps"], run["warmup_steps"]) == (10, 1)
    single = train(**{**RUN, "steps": 10, "eval_every": None, "warmup_steps": 1})
    assert single.losses[:2] == extended.losses[:2]  # same warmup, same data: the same first steps ...
    assert single.losses[6:] != extended.losses[6:]  # ... but the schedules differ after it
    again = train(out=tmp_path, resume=True, **{**RUN, "steps": 10, "eval_every": None})  # finished: nothing to do
    assert again.losses == extended.losses


def test_resume_mismatch_says_which_setting_old_and_new(tmp_path):
    train(out=tmp_path, **{**RUN, "steps": 2})
    with pytest.raises(ResumeMismatch) as e:
        train(out=tmp_path, resume=True, **{**RUN, "batch_size": 8, "warmup_steps": 2,
                                            "overrides": {**SMALL, "num_hidden_layers": 3}})
    assert e.value.differences == [("batch_size", 8, 4), ("overrides['num_hidden_layers']", 3, 2),
                                   ("warmup_steps", 2, 1)]
    message = str(e.value)
    assert "batch_size is 8 here but 4 in that run" in message and "warmup_steps is 2 here but 1" in message
    assert "To continue that run, pass its values" in message
    with pytest.raises(ResumeMismatch, match=r"seq_len is 64 here but 32"):
        train(out=tmp_path, resume=True, **{**RUN, "seq_len": 64})
    with pytest.raises(SettingError, match=r"steps \(1\) is before the checkpoint's step \(2\)"):
        train(out=tmp_path, resume=True, **{**RUN, "steps": 1})


def test_run_saved_before_the_checks_resumes_exactly(tmp_path):
    """tests/fixtures/run-0.1.0 was interrupted at step 3 of 6 by the code before this change; resuming it now
    reproduces the losses that code computed without interruption."""
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-0.1.0" / "checkpoint", tmp_path / "checkpoint")
    expected = load_file(ROOT / "tests" / "fixtures" / "run-0.1.0" / "expected.safetensors")
    overrides = dict(hidden_size=16, num_heads=2, num_kv_heads=1, num_hidden_layers=1, intermediate_size=32,
                     qk_norm=True, use_output_gate=True, use_k_shift=True, fgate_init_timescales=[2, 64])
    resumed = train(preset="tiny", overrides=overrides, task="segments", seq_len=16, batch_size=2, steps=6,
                    eval_batches=1, seed=3, progress=False, device="cpu", out=tmp_path, resume=True)
    torch.testing.assert_close(torch.tensor(resumed.losses, dtype=torch.float64), expected["losses"],
                               rtol=1e-6, atol=1e-6)
    assert resumed.evals[-1]["loss"] == pytest.approx(float(expected["eval_loss"]), rel=1e-6)


def test_interrupted_is_said_once_with_how_to_continue(tmp_path, capsys):
    train(out=tmp_path, callback=stop_at(2), **RUN)
    printed = capsys.readouterr()
    text = (printed.out + printed.err).replace(str(tmp_path), "OUT")  # (the folder's name says "interrupted")
    assert text.count("interrupted") == 1
    assert "interrupted at step 2/8: checkpoint saved in" in text and "--resume on the command line" in text
    train(out=tmp_path, **{**RUN, "steps": 3})  # starting over an unfinished run: says how to continue it instead
    assert "holds an unfinished run (step 2 of 8); this run starts over" in capsys.readouterr().out
    train(out=tmp_path, **{**RUN, "steps": 3})  # over a finished one: no resume hint
    out = capsys.readouterr().out
    assert "holds an earlier run (3 steps); this run replaces it" in out and "resume" not in out


# --- checkpoint files ---

def test_checkpoint_files_have_a_normal_mode_and_a_model_card(uninterrupted, tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, uninterrupted.model, uninterrupted.tokenizer, {"step": 1},
                        {"step": 1, "run": {"steps": 8, "task": {"name": "segments"}}})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "checkpoint").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    card = (tmp_path / "checkpoint" / "README.md").read_text()
    assert "import foxlab" in card and "AutoModelForCausalLM.from_pretrained" in card and "step 1 of 8" in card


def test_load_checkpoint_says_what_is_missing(uninterrupted, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    uninterrupted.model.save_pretrained(tmp_path / "model")  # a saved model is not a training checkpoint
    with pytest.raises(FileNotFoundError, match=r"model is a saved model, not a training checkpoint: it has "
                                                r"config.json but no training_state.pt .*from_pretrained"):
        load_checkpoint(tmp_path / "model")
    shutil.copytree(uninterrupted.out / "checkpoint", tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "checkpoint" / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint is not a complete training checkpoint: "
                                                r"trainer_state.json missing"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no checkpoint"):
        train(out=tmp_path / "empty", resume=True, **RUN)
    shutil.copytree(uninterrupted.out / "checkpoint", tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"holds a 'llama' model, not a foxlab 'forgetting_transformer'"):
        load_checkpoint(tmp_path / "llama")
