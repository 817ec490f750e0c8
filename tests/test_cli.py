"""The command line: train / resume / Ctrl-C, the demo (shortened), and one-line errors for bad arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import foxlab
import foxlab.train
from foxlab.__main__ import main
from foxlab.data import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--override", "hidden_size=32", "--override", "num_heads=2", "--override", "intermediate_size=64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(out, *extra):
    return ["train", "--preset", "tiny", *SMALL, "--task", "segments", "--seq-len", "32", "--batch-size", "4",
            "--steps", "6", "--seed", "1", "--eval-batches", "1", "--out", str(out), "--device", "cpu", "--no-progress",
            *extra]


def stop_at(step_to_stop):
    def callback(step, loss):
        if step == step_to_stop:
            raise KeyboardInterrupt  # as Ctrl-C would, from the callback
    return callback


def one_error_line(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err.strip()
    assert rc == expected_rc
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    return err


BASE = ["train", "--steps", "3", "--out", "{tmp}/a"]


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "huge", "--steps", "3", "--out", "{tmp}/a"],
     "argument --preset: must be one of 'tiny', 'fox-125m',"),
    (["train", "--preset", "fox-125", "--steps", "3", "--out", "{tmp}/a"], "did you mean 'fox-125m'?"),
    (["train", "--task", "sorting", "--steps", "3", "--out", "{tmp}/a"],
     "argument --task: must be one of 'segments', 'recall', 'text'"),
    (["train", "--steps", "0", "--out", "{tmp}/a"], "argument --steps: must be an integer >= 1, got 0"),
    (["train", "--steps", "-5", "--out", "{tmp}/a"], "argument --steps: must be an integer >= 1, got -5"),
    (["train", "--steps", "ten", "--out", "{tmp}/a"], "argument --steps: must be an integer >= 1, got 'ten'"),
    (["train", "--steps", "3", "--out", "{tmp}/file/sub"], "cannot write to"),
    (["train", "--steps", "3", "--out", "{tmp}/nothing", "--resume"],
     "--resume: no checkpoint to resume from: {tmp}/nothing does not exist"),
    (BASE + ["--save-every", "0"], "argument --save-every: must be an integer >= 1"),
    (BASE + ["--override", "num_heads"], "KEY=VALUE"),
    (BASE + ["--lr", "-1"], "argument --lr: must be a number > 0, got -1.0"),
    (BASE + ["--lr", "fast"], "argument --lr: must be a number > 0, got 'fast'"),
    (BASE + ["--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
    (BASE + ["--warmup-steps", "-4"], "argument --warmup-steps: must be an integer >= 0, got -4"),
    (BASE + ["--warmup-steps", "9"], "--warmup-steps: warmup_steps (9) must be at most steps (3)"),
    (BASE + ["--eval-batches", "0"], "argument --eval-batches: must be an integer >= 1, got 0"),
    (BASE + ["--eval-every", "0"], "argument --eval-every: must be an integer >= 1, got 0"),
    (BASE + ["--batch-size", "2.5"], "argument --batch-size: must be an integer >= 1, got '2.5'"),
    (BASE + ["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (BASE + ["--seq-len", "4"], "task 'segments': seq_len must be an integer >= 8, got 4"),
    (BASE + ["--device", "gpu"], "argument --device: must be a torch device such as 'cpu', 'cuda' or 'cuda:1'"),
    (BASE + ["--override", "num_layers=3"], "--override: unknown setting 'num_layers'; did you mean "
                                            "'num_hidden_layers'?"),
    (BASE + ["--override", "qk_norm=no"], "--override: qk_norm must be True or False, got 'no' (a str)"),
    (BASE + ["--override", 'hidden_ratio="4"'], "hidden_ratio must be a number > 0, got '4' (a str)"),
    (BASE + ["--override", "dtype=float16"], "--override: unknown setting 'dtype'; valid settings: acp_log_tolerance, attn_backend"),
    (BASE + ["--override", "num_heads=3"], "hidden_size (128) must be divisible by num_heads (3)"),
    (BASE + ["--text-file", "{tmp}/file"], "--text-file is only for --task text"),
    (BASE + ["--bogus"], "unrecognized arguments: --bogus"),
    (BASE + ["--parallel", "zero3"], "argument --parallel: must be one of"),
    (BASE + ["--cuda-graph", "--device", "cpu"], "--cuda-graph: cuda_graph=True needs one process on a CUDA device, "
                                                 "got device cpu"),
    (["demo", "--out", "{tmp}/file"], "cannot write to"),
    (["demo", "--out", "{tmp}/a", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["demo", "--out", "{tmp}/a", "--device", "gpu"], "argument --device: must be a torch device"),
    (["demo", "--out", "{tmp}/a", "--resume"], "--resume: no checkpoint to resume from: {tmp}/a does not exist"),
    (["fly"], "invalid choice: 'fly'"),
    ([], "foxlab: error: name a command, train or demo (foxlab --help says more)"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not a folder")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert message.replace("{tmp}", str(tmp_path)) in one_error_line(capsys, rc)
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "a").exists()


def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["train", "--steps", "3", "--out", str(tmp_path), "--device", "cuda"])
    assert "argument --device: 'cuda' is not available: this torch" in one_error_line(capsys, rc)


def test_help_lists_the_presets_and_says_what_extending_does(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in foxlab.PRESETS) and "segments, recall, text" in text
    assert "a larger value extends the run" in text and "not the same as a run of that length" in text


def test_bad_arguments_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "foxlab", "train", "--device", "gpu", "--steps", "3", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "foxlab train: error: argument --device: must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"]


def test_train_ctrl_c_and_resume_from_the_command_line(tmp_path, capsys, monkeypatch):
    assert main(train_args(tmp_path / "full")) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert len(full["losses"]) == 6 and full["step"] == 6 and "done: 6 steps" in capsys.readouterr().out

    real_train = foxlab.train.train
    monkeypatch.setattr(foxlab.train, "train", lambda **kwargs: real_train(callback=stop_at(4), **kwargs))
    assert main(train_args(tmp_path / "cut", "--save-every", "3")) == 130
    printed = capsys.readouterr()
    said = (printed.out + printed.err).replace(str(tmp_path), "TMP")
    assert said.count("interrupted") == 1 and "interrupted at step 4/6" in said and "--resume" in said
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())["losses"]) == 4
    monkeypatch.setattr(foxlab.train, "train", real_train)
    assert main(train_args(tmp_path / "cut", "--resume")) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["losses"] == full["losses"] and resumed["eval_loss"] == full["eval_loss"]
    # resuming with other settings would not continue the same run: refused in one line, saying how to proceed
    rc = main(train_args(tmp_path / "cut", "--resume", "--batch-size", "8", "--override", "num_hidden_layers=3"))
    err = one_error_line(capsys, rc)
    assert "--batch-size 8 here, --batch-size 4 in that run" in err
    assert "--override num_hidden_layers=3 here, no --override num_hidden_layers in that run" in err
    assert "To continue that run, pass --batch-size 4 no --override num_hidden_layers;" in err


def test_extend_a_finished_run_from_the_command_line(tmp_path, capsys):
    """The issue's case: a run, then a larger --steps with --resume (the default warmup, 10% of the steps, stays
    the first run's)."""
    assert main(train_args(tmp_path, "--steps", "4")) == 0
    capsys.readouterr()
    assert main(train_args(tmp_path, "--steps", "7", "--resume")) == 0
    assert "extending the run from 4 to 7 steps" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["losses"]) == 7 and metrics["run"]["warmup_steps"] == 1
    rc = main(train_args(tmp_path, "--steps", "7", "--resume", "--warmup-steps", "3"))
    assert "pass --warmup-steps 1;" in one_error_line(capsys, rc)


def test_demo_short_run(tmp_path, capsys, monkeypatch):
    """The demo for 40 steps, interrupted at step 20 and resumed (which gives the same run)."""
    pytest.importorskip("plotly", reason="the demo's report needs plotly (a foxlab dependency)")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "40", "--device", "cpu", "--no-progress"]
    real_train = foxlab.train.train
    monkeypatch.setattr(foxlab.train, "train", lambda **kwargs: real_train(callback=stop_at(20), **kwargs))
    assert main(args) == 130
    said = capsys.readouterr().out.replace(str(tmp_path), "TMP")
    assert said.count("interrupted") == 1 and "--resume on the command line" in said
    assert json.loads((out / "metrics.json").read_text())["interrupted"] and not (out / "report.html").exists()
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and str(out / "checkpoint") in printed
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["losses"]) == 40 and m["final_loss"] == m["losses"][-1] and m["final_loss"] < 2.5
    cfg = foxlab.ForgettingTransformerConfig.from_preset("tiny")
    grid = m["boundary_forget_ratio_per_head"]
    assert len(grid) == cfg.num_hidden_layers and all(len(row) == cfg.num_heads for row in grid)
    assert m["boundary_forget_ratio"] == min(min(row) for row in grid)
    assert m["boundary_forget_ratio"] <= 0.5  # it learns to forget at resets within a few dozen steps
    assert m["optimal_loss"] < m["final_loss"] and m["train_time_s"] > 0
    assert (out / "report.html").stat().st_size > 10_000
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in report[:2000].lower()
    assert "<p>Task &#x27;segments&#x27;: sequences of 128 tokens" in report  # what the model learned, and how well
    assert f"<td>eval loss</td><td>{m['eval_loss']:.4g}</td>" in report
    assert f"optimal ({m['optimal_loss']:.3f})" in report  # the optimal-loss line on the loss plot
    assert f"<td>boundary_forget_ratio</td><td>{m['boundary_forget_ratio']:.4g} (layer " in report
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert type(tok) is ByteTokenizer and model.config.vocab_size == len(tok)
    ids = tok("<reset>abab", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
