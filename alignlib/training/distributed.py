"""Data parallelism for the sampling methods (RRHF, RAFT): N processes compute what one process would.

Under ``accelerate launch --num_processes N`` every process draws the **same** global batch of Q queries (the
trainers' ``random.Random(seed)`` advance identically), keeps the contiguous shard ``rank * Q/N ...`` of it, and
samples each query from its own random stream (``generate(row_seeds=...)``): the samples of query i do not
depend on the process that holds it. The model is wrapped by ``accelerator.prepare`` (DDP, FSDP or DeepSpeed),
which averages gradients over processes, so a loss that is a sum over queries divided by the local count Q/N
gives the gradient of the global sum divided by Q, as one process would. Gathering keeps rank order, so the
gathered list is the global batch in its original order.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch


def cpu_only() -> bool:
    """No CUDA device: accelerate must be told, or ``accelerate launch`` on CPUs starts N one-process runs."""
    return not torch.cuda.is_available()


def process_state():
    """accelerate's process-wide state (rank, process count, main process), gloo on CPU-only machines."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def make_accelerator(accelerator=None, seed_per_query: bool = True, method: str = "training"):
    """``accelerator`` or a new ``Accelerator`` (gloo on CPU-only machines). Refuses a launch whose N processes
    did not join one group, which would otherwise train N independent copies of the run, and several processes
    without ``seed_per_query`` (a prompt would be sampled differently depending on the process that holds it)."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=cpu_only())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world(accelerator)[1] != launched:
        raise RuntimeError(f"accelerate launch started {launched} processes but this Accelerator sees "
                           f"{world(accelerator)[1]}; on a machine without CUDA pass Accelerator(cpu=True).")
    if world(accelerator)[1] > 1 and not seed_per_query:
        raise ValueError(f"{method} on several processes needs seed_per_query=True, so that each prompt is sampled "
                         "the same way whichever process holds it.")
    return accelerator


def world(accelerator) -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def shard(items: Sequence, accelerator, what: str = "batch_size") -> list:
    """This process's contiguous share of a global batch; the batch must split evenly over the processes."""
    rank, size = world(accelerator)
    if len(items) % size:
        raise ValueError(f"{what}={len(items)} does not split over {size} processes; use a multiple of {size} so "
                         "every process holds the same number of queries (their gradients are averaged).")
    n = len(items) // size
    return list(items[rank * n:(rank + 1) * n])


def query_seeds(seed: int, step: int, n: int) -> list[int]:
    """One sampling seed per query of a global batch: a function of (run seed, step, position in the batch) only."""
    return [(int(seed) * 1_000_003 + step) * 100_003 + i for i in range(n)]


def gather_objects(items: list, accelerator) -> list:
    """The concatenation over processes (in rank order) of each process's list; the list itself on one process."""
    if world(accelerator)[1] == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def gather_tensor(t: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' tensors concatenated along dim 0 (rank order)."""
    return t if world(accelerator)[1] == 1 else accelerator.gather(t.contiguous())


def mean_over_processes(stats: dict, accelerator) -> dict:
    """Average scalar statistics over processes (a loss divided by the local query count averages to the global)."""
    if world(accelerator)[1] == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))
