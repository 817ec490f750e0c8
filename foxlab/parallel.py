"""Data-parallel training: DDP or sharded (FSDP2) wrapping, and checkpoint state that fits any number of processes.

``ddp`` keeps a whole copy of the weights, gradients and AdamW moments on every process and averages the
gradients. ``fsdp`` (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``) gives each process 1/N of them:
each block's weights are gathered just before they are used (forward and backward) and freed after, and the
gradients are reduce-scattered, so a model whose weights and optimizer state outgrow one GPU still trains. Both
average the gradients over processes and follow the same trajectory as one process with the same global batch.

Checkpoints do not depend on either: the weights are gathered into one ``save_pretrained`` folder, and the
optimizer state is saved in full, keyed by parameter name (``torch.distributed.checkpoint.state_dict``), so a
run can resume with another number of processes or the other mode.
"""

from __future__ import annotations

import torch

PARALLEL_MODES = ("ddp", "fsdp")
_FULL = dict(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU, on rank 0 only


def _is_sharded(cls: type) -> bool:
    """Whether ``cls`` is a module class that ``fully_shard`` made (it subclasses the original class)."""
    from torch.distributed.fsdp import FSDPModule

    return issubclass(cls, FSDPModule)


def check_parallel(parallel) -> None:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")


def wrap_model(model: torch.nn.Module, parallel: str, world: int, device: torch.device) -> torch.nn.Module:
    """Put ``model`` on ``device`` for training with ``world`` processes; returns the module to run forward with.

    One process: the model itself. ``ddp``: a DistributedDataParallel wrapper (``model`` stays the plain module).
    ``fsdp``: ``model`` itself, sharded in place, one FSDP unit per block plus one for the rest (embeddings,
    final norm, head); its parameters become DTensors holding this process's shard. Build the optimizer after
    this call (on ``model.parameters()``)."""
    check_parallel(parallel)
    if world == 1:
        return model.to(device)
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The weights stay where they are (the CPU) until fully_shard moves each unit's shard to the device, so no
    # device ever holds the whole model.
    mesh = init_device_mesh(device.type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A model holding all the weights, for ``save_pretrained``: ``model`` itself unless it is sharded; then
    (a collective call: every process must make it) a plain copy on the CPU on rank 0, and None elsewhere."""
    if not _is_sharded(type(model)):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(**_FULL))
    if not weights:  # not rank 0
        return None
    plain_class = next(c for c in type(model).__mro__ if not _is_sharded(c))
    with torch.device("meta"):  # no memory and no initialization: every tensor comes from `weights`
        copy = plain_class(model.config)
    copy.load_state_dict(weights, assign=True)
    copy.tie_weights()  # assign=True gives tied weights two tensors again
    return copy.train(model.training)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, on the CPU (complete on rank 0; a collective call
    when the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:  # no step taken yet (get_optimizer_state_dict would take a zero step to fill it in)
        return {"state": {}, "param_groups": []}
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from ``optimizer_state`` (any number of processes, either mode) into ``optimizer``, which was
    built on ``model``'s parameters after ``wrap_model``. Every process passes the same whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state["state"]:  # saved before the first step: nothing to restore
        return
    first_key = next((key for group in state["param_groups"] for key in group["params"]), None)
    if isinstance(first_key, int):  # a format-1 checkpoint: optimizer.state_dict(), keyed by parameter index
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
