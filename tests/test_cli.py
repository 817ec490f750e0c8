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


def one_error_line(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err.strip()
    assert rc == expected_rc
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "huge", "--steps", "3", "--out", "{tmp}/a"], "unknown preset 'huge'"),
    (["train", "--task", "sorting", "--steps", "3", "--out", "{tmp}/a"], "unknown task 'sorting'"),
    (["train", "--steps", "0", "--out", "{tmp}/a"], "--steps must be a positive integer"),
    (["train", "--steps", "-5", "--out", "{tmp}/a"], "--steps must be a positive integer"),
    (["train", "--steps", "ten", "--out", "{tmp}/a"], "invalid int value"),
    (["train", "--steps", "3", "--out", "{tmp}/file/sub"], "cannot write to"),
    (["train", "--steps", "3", "--out", "{tmp}/nothing", "--resume"], "no checkpoint in"),
    (["train", "--steps", "3", "--out", "{tmp}/a", "--save-every", "0"], "positive integer"),
    (["train", "--steps", "3", "--out", "{tmp}/a", "--override", "num_heads"], "KEY=VALUE"),
    (["demo", "--out", "{tmp}/file"], "cannot write to"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not a folder")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert message in one_error_line(capsys, rc)
    assert not (tmp_path / "nothing").exists()


def test_bad_model_override_is_one_line(tmp_path, capsys):
    rc = main(train_args(tmp_path, "--override", "num_heads=3"))  # 32 is not divisible by 3
    assert "divisible" in one_error_line(capsys, rc, expected_rc=1)


def test_bad_arguments_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "foxlab", "train", "--task", "nope", "--steps", "3", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "foxlab train: error: unknown task 'nope'; choose one of segments, recall, text"]


def test_train_ctrl_c_and_resume_from_the_command_line(tmp_path, capsys, monkeypatch):
    assert main(train_args(tmp_path / "full")) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert len(full["losses"]) == 6 and full["step"] == 6 and "done: 6 steps" in capsys.readouterr().out

    real_train = foxlab.train.train

    def interrupted_train(**kwargs):
        def ctrl_c(step, loss):
            if step == 4:
                raise KeyboardInterrupt
        return real_train(callback=ctrl_c, **kwargs)

    monkeypatch.setattr(foxlab.train, "train", interrupted_train)
    assert main(train_args(tmp_path / "cut", "--save-every", "3")) == 130
    assert "interrupted at step 4/6" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())["losses"]) == 4
    monkeypatch.setattr(foxlab.train, "train", real_train)
    assert main(train_args(tmp_path / "cut", "--resume")) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["losses"] == full["losses"] and resumed["eval_loss"] == full["eval_loss"]
    # resuming with a different batch size would not continue the same run: refused in one line
    rc = main(train_args(tmp_path / "cut", "--resume", "--batch-size", "8"))
    assert "batch_size" in one_error_line(capsys, rc, expected_rc=1)


def test_demo_short_run(tmp_path, capsys):
    pytest.importorskip("plotly", reason="the demo's report needs plotly (a foxlab dependency)")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "40", "--device", "cpu", "--no-progress"]) == 0
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
