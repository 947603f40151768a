"""Multi-process training with PyTorch's own DDP, as launched by `torchrun`.

torchrun starts one process per device and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `DistContext` carries that place;
every collective the trainer needs is a small function here that is a no-op (or the
identity) in a single process, so the trainer reads the same with one process or many.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from detr_train.distributed.launch import SINGLE_PROCESS, DistContext, context_from_environment
from detr_train.errors import DetrTrainError

__all__ = ["SINGLE_PROCESS", "DistContext", "context_from_environment"]

log = logging.getLogger(__name__)

# Long enough for rank 0 to generate or convert a dataset while the others wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def start(ctx: DistContext, device_name: str) -> None:
    """Join the process group: NCCL when this job trains on GPUs, gloo on CPU."""
    if not ctx.enabled or dist.is_initialized():
        return
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("Distributed: rank %d of %d (%s backend)", ctx.rank, ctx.world_size, backend)


def stop(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """Each rank drives its own GPU (LOCAL_RANK); on CPU all ranks share the host."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a dataset), then the others reuse its result."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the others."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on at least one (decisions taken in lockstep)."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parameter_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares of every parameter, in float64: equal replicas, equal fingerprints."""
    total = torch.zeros(2, dtype=torch.float64)
    for param in model.parameters():
        values = param.detach().double().cpu()
        total += torch.stack([values.sum(), (values * values).sum()])
    return total


class ReplicaDivergenceError(DetrTrainError, RuntimeError):
    """DDP replicas hold different parameters: gradients were not averaged the same way everywhere."""


def check_replicas(model: torch.nn.Module, ctx: DistContext, step: int) -> None:
    """Raise on every rank if the parameter fingerprints of the ranks differ."""
    if not ctx.enabled:
        return
    fingerprint = parameter_fingerprint(model).to(collective_device())
    gathered = [torch.empty_like(fingerprint) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise ReplicaDivergenceError(
            f"DDP replicas diverged at step {step}: parameter fingerprints {[g.tolist() for g in gathered]}"
        )
    log.info("step %d: parameters identical on all %d ranks", step, ctx.world_size)


def quiet_non_main_logging(ctx: DistContext) -> None:
    """Only rank 0 narrates; the other ranks still report warnings and errors, marked with their rank."""
    if ctx.is_main:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {ctx.rank}][%(name)s][%(levelname)s] - %(message)s"))


def wrap_ddp(
    model: torch.nn.Module, ctx: DistContext, device: torch.device, *, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun; the model itself otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
