"""foxlab.cuda_graph and train(cuda_graph=True): the optimizer made capturable, checkpoints that resume in either
mode (CPU), and on a CUDA GPU training runs replayed as graphs against eager ones, exact resumes, and FoX Pro with
adaptive computation pruning inside the graph."""

import pytest
import torch

import foxlab
from foxlab.cuda_graph import GraphedStep, make_capturable, portable_state
from foxlab.train import make_optimizer, train

SMALL = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, intermediate_size=64)
PRO = dict(SMALL, qk_norm=True, use_output_gate=True, use_output_norm=True, use_k_shift=True, use_v_shift=True)
RUN = dict(task="segments", seq_len=64, batch_size=4, steps=8, lr=3e-3, eval_every=4, eval_batches=1, seed=0,
           progress=False)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_portable_state_has_float_rates_and_no_capture_flags():
    model = foxlab.ForgettingTransformerForCausalLM(foxlab.ForgettingTransformerConfig.from_preset("tiny", **SMALL))
    optimizer = make_optimizer(model, 1e-3, 0.1)
    for group in optimizer.param_groups:
        group.update(lr=torch.tensor(2e-3), capturable=True, fused=True)
    saved = portable_state(optimizer.state_dict())
    assert [group["lr"] for group in saved["param_groups"]] == [pytest.approx(2e-3)] * 2
    assert all(type(group["lr"]) is float and group["capturable"] is False and group["fused"] is None
               for group in saved["param_groups"])
    assert optimizer.param_groups[0]["capturable"] and isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    scheduler = {"base_lrs": [1e-3], "_last_lr": [torch.tensor(5e-4)], "last_epoch": 3}
    assert portable_state(scheduler) == {"base_lrs": [1e-3], "_last_lr": [pytest.approx(5e-4)], "last_epoch": 3}
    restored = make_optimizer(model, 1e-3, 0.1)
    restored.load_state_dict(saved)  # an eager optimizer takes it as it is


def test_make_capturable_refuses_what_it_cannot_capture():
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(TypeError, match="make_capturable takes torch.optim.Adam or AdamW, got SGD"):
        make_capturable(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="a CUDA graph needs the parameters on a CUDA device, got cpu"):
        make_capturable(torch.optim.AdamW(params))
    with pytest.raises(ValueError, match="warmup must be an integer >= 1"):
        GraphedStep(lambda: None, torch.optim.AdamW(params), warmup=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("overrides", [SMALL, PRO], ids=["fox", "fox-pro"])
@pytest.mark.parametrize("acp", [None, -8.0], ids=["exact", "acp"])
def test_graph_training_follows_eager_training(overrides, acp):
    """The same run eagerly and as CUDA graphs: the same losses up to the two AdamW implementations' rounding."""
    runs = [train(overrides=overrides, acp_log_tolerance=acp, device="cuda", cuda_graph=graph, **RUN)
            for graph in (False, True)]
    eager, graphed = (torch.tensor(r.losses) for r in runs)
    print(f"\nmax |loss difference| {(eager - graphed).abs().max():.2e}", end="")
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)
    assert runs[1].lrs == runs[0].lrs
    assert abs(runs[1].evals[-1]["loss"] - runs[0].evals[-1]["loss"]) < 1e-2


@pytest.mark.gpu
@gpu
def test_graph_run_resumes_exactly_and_in_either_mode(tmp_path):
    """Stopped after 4 of 10 steps and resumed with graphs (3 eager steps, then a new capture): the uninterrupted
    graph run's losses, bitwise. Its checkpoint also resumes eagerly, on the CPU."""
    run = dict(RUN, steps=10, overrides=PRO, device="cuda", cuda_graph=True)
    whole = train(**run)

    def stop_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt
    first = train(out=tmp_path / "a", callback=stop_at_4, **run)
    assert first.interrupted and first.losses == whole.losses[:4]
    resumed = train(out=tmp_path / "a", resume=True, **run)
    assert resumed.losses == whole.losses and resumed.lrs == whole.lrs
    on_cpu = train(out=tmp_path / "b", resume=tmp_path / "a" / "checkpoint", **dict(run, device="cpu", cuda_graph=False,
                                                                                    steps=12))
    assert on_cpu.step == 12 and on_cpu.losses[:10] == whole.losses
    assert max(on_cpu.losses[10:]) < whole.losses[0] - 0.5  # it carried on from the trained state
