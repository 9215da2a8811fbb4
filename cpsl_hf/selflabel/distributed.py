"""The two collectives the self-labeling step needs. Without an initialised process group (or with one process)
they are identities, so the same code runs on a laptop and on many GPUs."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "all_reduce_sum", "process_rank_and_count"]


def process_rank_and_count(process_group=None) -> tuple[int, int]:
    """(rank, world size) in ``process_group``; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every process) from all processes along dim 0, in rank order.
    No gradient flows through (MoCo's ``concat_all_gather``)."""
    _, world = process_rank_and_count(process_group)
    if world == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    tensor = (tensor.to(torch.uint8) if is_bool else tensor).contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=process_group)
    gathered = torch.cat(parts, dim=0)
    return gathered.to(torch.bool) if is_bool else gathered


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor; the input is left alone)."""
    _, world = process_rank_and_count(process_group)
    if world == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, group=process_group)
    return total
