"""Training steps as one CUDA graph: the whole step (forward, backward, gradient clipping, optimizer update)
captured once and replayed, so that a step costs the GPU's time and one launch of host time.

Why: a small model on a fast GPU is host-bound. Every kernel launch costs host time (Python, Triton's or
PyTorch's dispatch, the driver: 10-30 us), and a fused op's autograd Function a few hundred microseconds per
step for its forward and backward together. A 12-layer model launches several hundred kernels per step: on an
H200, FoX Pro at 125M parameters needs ~60 ms of host time per step for ~41 ms of GPU work, so eager training
runs at the host's speed (and slows down whenever the host does). Replayed as a graph, the same step runs at
its GPU time (BENCHMARKS.md; ``benchmarks/train_step.py --cuda-graph``).

What a captured step needs (PyTorch's "whole network capture", see ``torch.cuda.graphs``):

- static inputs: the step reads its batch from tensors that are refilled in place before each replay;
- static shapes, and no host synchronisation inside the step (a foxlab model's training forward and backward
  have none: its checks that would wait for the GPU are skipped on CUDA);
- gradients written, not accumulated: they are set to None before the capture, so the captured backward
  allocates them from the graph's memory and every replay overwrites them;
- an optimizer that can be captured, with its learning rate a GPU tensor that the schedule refills every step
  (``make_capturable``); a float learning rate would be frozen into the graph as a constant;
- autocast without its cast cache (a cached cast would outlive the capture);
- a few eager steps first, on a side stream, so that everything lazy (Triton's compilation, cuBLAS workspaces,
  the optimizer's state) happens before the capture.

The graph keeps its activations allocated between steps: peak memory is that of an eager step, held.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

WARMUP_STEPS = 3


@functools.lru_cache(maxsize=None)
def _side_stream(device: int) -> torch.cuda.Stream:
    """One warm-up stream per GPU. PyTorch keeps a cuBLAS workspace per stream it ever ran a matmul on, so a new
    stream per graph would add one (~0.1 GiB) each time."""
    return torch.cuda.Stream(device)


class GraphedStep:
    """Calls of ``step`` as training steps: the first ``warmup`` run eagerly on a side stream, the next is captured
    in a CUDA graph, and every call from then on replays it.

    step: runs forward, backward and the optimizer update, reading its inputs from tensors the caller refills in
    place before each call, and returns what the caller reads afterwards (the loss). It must not zero the
    gradients: this class sets them to None before each eager step and before the capture.
    device: the GPU the step runs on (default: the current one).
    """

    def __init__(self, step: Callable[[], object], optimizer: torch.optim.Optimizer, warmup: int = WARMUP_STEPS,
                 device: torch.device | str | None = None):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (eager steps before the capture), got {warmup!r}")
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.device = torch.device(device) if device is not None else None
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        index = self.device.index if self.device is not None else None  # None: the current device
        with torch.cuda.device(torch.cuda.current_device() if index is None else index):
            return self._warm_up_or_capture()

    def _warm_up_or_capture(self):
        self.optimizer.zero_grad(set_to_none=True)
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            side = _side_stream(torch.cuda.current_device())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step()
        except RuntimeError as exc:
            raise RuntimeError(f"this training step cannot be captured in a CUDA graph ({exc}); train without "
                               f"cuda_graph") from exc
        self.graph = graph
        graph.replay()  # the capture only recorded the step: this runs it
        return self.outputs


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Make an Adam or AdamW ready for capture, in place: fused and capturable, its step counters on the
    parameters' GPU, each group's learning rate a GPU tensor. Call it after building the LR scheduler (and after
    loading a saved state): the scheduler's base rates stay floats and it then refills the tensors in place."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"make_capturable takes torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    for group in (group for group in optimizer.param_groups if group["params"]):
        device = group["params"][0].device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the parameters on a CUDA device, got {device}")
        group.update(capturable=True, fused=True, foreach=None)
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)


def portable_state(state: dict) -> dict:
    """A copy of an optimizer's or LR scheduler's ``state_dict()`` as a run without CUDA graphs has it: learning
    rates as floats, the optimizer not marked capturable or fused. A checkpoint then resumes in either mode, and
    on a machine without a GPU."""
    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = [{**group, "lr": float(group["lr"]), "capturable": False, "fused": None}
                                 for group in state["param_groups"]]
    if "_last_lr" in state:
        state["_last_lr"] = [float(lr) for lr in state["_last_lr"]]
    return state
