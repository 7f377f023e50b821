"""Training on several processes with PyTorch's own engine: ``torch.distributed`` with
DistributedDataParallel, launched by ``torchrun`` (gloo on the CPU, NCCL on GPUs).

Truncated BPTT trains a batch of parallel streams (the columns of ``batchify``'s output);
rank r of W owns the contiguous columns [r·B/W, (r+1)·B/W) of the global batch B and carries
their hidden state from window to window, so the ranks together see exactly the data one
process would at batch B. DDP averages the gradients; every decision that could differ
between ranks (the wall clock, a signal) is taken by all of them together; evaluation
sums loss and tokens over the ranks. Rank 0 alone writes the run directory.

Without a distributed environment (no ``WORLD_SIZE`` above 1) :func:`world` is a single
process and nothing here runs a collective.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from whiteboard.errors import WhiteboardError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory, the log and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def check_batch(self, batch: int, what: str = "train.batch_size") -> None:
        if batch % self.size:
            raise WhiteboardError(f"{what} {batch} does not divide over {self.size} processes: each process trains "
                                  f"an equal share of the batch's streams; use a multiple of {self.size}")

    def columns(self, batch: int) -> slice:
        """This rank's share of ``batch`` columns (contiguous, in rank order; may be empty
        where the batch is smaller than the world, as an evaluation batch may be)."""
        bounds = [batch * r // self.size for r in range(self.size + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])

    # ------------------------------------------------------------------ collectives

    def all_sum(self, values: list[float]) -> list[float]:
        """The sums over all ranks, in float64 (identical on every rank)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true on every rank where it is true on any (a signal, the clock)."""
        if not self.distributed:
            return list(flags)
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def decide(self, value: bool) -> bool:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([int(value)], dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def gather_columns(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The ranks' ``tensor`` joined along ``dim`` in rank order (each rank's hidden state
        for its columns -> the whole batch's). Every rank must call it."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def gather_bytes(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's uint8 tensor (a random generator's state), in rank order."""
        if not self.distributed:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world(device: str = "cpu") -> World:
    """This process's place in a ``torchrun`` job (joining its process group), or a single
    process where no distributed environment is present."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank)


def leave(world_: World, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank waits for the others first:
    gloo aborted a rank that tore its group down while rank 0 was still writing the run
    directory. After an error no rank waits (torchrun stops the others)."""
    if world_.distributed and dist.is_initialized():
        # A DistributedDataParallel wrapper still alive when its group is destroyed aborts
        # the process when it is collected later: collect it first.
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()
