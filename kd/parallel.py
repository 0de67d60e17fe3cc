"""Data parallelism under `torchrun`: who this process is, and the few collectives training needs.

`kd distill` started by `torchrun --nproc-per-node N` joins the process group that torchrun's
environment describes (gloo on CPU; nccl, one GPU per process, where CUDA is available). Every
rank computes the same global batches; each takes a contiguous slice of every batch
(`shard`), runs the student on it, and `gather_rows` puts the slices' outputs back together
so the loss is the single-process loss of the whole batch. Only rank 0 writes files. Without a
process group every helper is the single-process identity. A student with `parallel.strategy:
fsdp` trains fully sharded instead of replicated (the last section: FSDP2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from copy import deepcopy
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kd.errors import KDError

T = TypeVar("T")
_joined = False  # the group is ours to leave


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise or if joined.

    A missing MASTER_ADDR fails at once; peers that never come (WORLD_SIZE set by hand, no
    torchrun) fail after torch's default timeout, 30 minutes.
    """
    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (ValueError, RuntimeError) as exc:
            env = ", ".join(f"{k}={os.environ.get(k)}" for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KDError(f"cannot join the process group ({env}): {first}; start data-parallel runs with "
                          "torchrun") from None
        _joined = True
    return world()


def finish() -> None:
    """Leave the process group `init_from_env` joined (after the last collective)."""
    global _joined
    if _joined:
        dist.destroy_process_group()
        _joined = False


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def device() -> torch.device:
    """Where a rank trains: its GPU under nccl, else the CPU (single-process training is CPU-only)."""
    if world()[1] > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result sent to every rank: one decision (is a twin stored? is
    there a checkpoint?) that all ranks follow, so their collectives line up. Plain containers
    and tensors only; the bytes travel between this job's own ranks."""
    if world()[1] == 1:
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(rows: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous slice of a batch of `rows` rows: sizes as even as possible, the
    first `rows % world_size` ranks one row more (np.array_split's rule); empty when rows < world."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def row_counts(rows: int) -> list[int]:
    """Every rank's number of rows in the current batch (one small collective)."""
    counts = torch.tensor([rows], device=device())
    every = [torch.zeros_like(counts) for _ in range(world()[1])]
    dist.all_gather(every, counts)
    return [int(c) for c in every]


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The rows of every rank in rank order (= the global batch), differentiable: the backward
    pass sums the global gradient over ranks and keeps this rank's rows, so that DDP's average
    of parameter gradients is the gradient of the global loss every rank computes."""
    return _GatherRows.apply(x, counts)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.rows = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        padded = x.new_zeros(max(counts), *x.shape[1:])  # all_gather wants one shape on every rank
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rows], None


# --- fully sharded students (parallel.strategy: fsdp) ------------------------------------------
# FSDP2 (`torch.distributed.fsdp.fully_shard`; gloo on CPU, nccl on GPUs): each rank holds 1/N of
# every parameter, gradient and AdamW state; a transformer block's full weights exist only during
# its own forward and backward. Batches, slices and the gathered loss are DDP's; the gradients'
# reduce-scatter averages over ranks as DDP's all-reduce does: the single-process run up to rounding.
# Training runs on a sharded copy of the model (`vacated_copy`): the caller's model gives its
# parameters' storage up meanwhile and takes the trained weights back (`unshard_into`), so that
# it saves as an ordinary Hugging Face directory.


def vacated_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` to shard and train (FSDP modules cannot be turned back into plain ones);
    `model` keeps its structure and non-persistent buffers but gives its parameters' storage up
    until `unshard_into`. The copy is the model alone: loss terms hold their extra modules (a
    projection) in closures, so those are sharded where they are; a term reaches the model only
    through what `training.step` gives it (outputs, tapped layers), never a closure of its own."""
    copy = deepcopy(model)
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    return copy


def fully_sharded(module: nn.Module) -> nn.Module:
    """`module`, sharded in place (every rank calls it) and returned: each block a Hugging Face
    model names in `_no_split_modules` one FSDP unit, the rest (embeddings, head, extra modules)
    the root's; the shards move to this rank's device."""
    from torch.distributed.fsdp import fully_shard

    blocks = {name for m in module.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for block in [m for m in module.modules() if type(m).__name__ in blocks]:
        fully_shard(block)
    return fully_shard(module)


def unshard_into(sharded: nn.Module, module: nn.Module) -> None:
    """Every rank: `module` (what `vacated_copy` copied) takes the trained weights and buffers of
    its sharded copy back, gathered one parameter at a time, on the CPU."""
    from torch.distributed.tensor import DTensor

    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    for name, p in sharded.named_parameters():
        params[name].data = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    for name, b in sharded.named_buffers():
        buffers[name].data = b.detach().cpu()


def full_state(sharded: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The sharded module's weights and its optimizer's state, whole, on rank 0 (None elsewhere;
    every rank calls it): {"weights": a state dict, "optimizer": as `optimizer.state_dict()` of
    the unsharded module gives it (parameters numbered in order), so a checkpoint resumes under
    any strategy or world size}."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(sharded, options=options)
    named = get_optimizer_state_dict(sharded, optimizer, options=options)  # keyed by parameter name
    if not is_main():
        return None
    number = {name: i for i, (name, _) in enumerate(sharded.named_parameters())}
    return {"weights": weights, "optimizer": _renumber(named, number)}


def load_optimizer_state(sharded: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`full_state`'s optimizer state (parameters numbered) into the optimizer of the sharded
    module, on every rank (each holds the whole state and keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = dict(enumerate(name for name, _ in sharded.named_parameters()))
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(sharded, optimizer, _renumber(state, names), options=options)


def _renumber(state: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict with its parameters renamed by `key` (names <-> numbers)."""
    return {"state": {key[p]: values for p, values in state["state"].items()},
            "param_groups": [{**group, "params": [key[p] for p in group["params"]]} for group in state["param_groups"]]}
