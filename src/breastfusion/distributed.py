"""Multi-process training with PyTorch DDP, started the standard way: ``torchrun --nproc_per_node N``.

Nothing changes for a single process. Under torchrun (``WORLD_SIZE`` > 1) :func:`init_distributed` joins the
process group (``nccl`` on GPUs, ``gloo`` on CPU), the trainer wraps the model in DistributedDataParallel,
shards the training data with a DistributedSampler, shards feature extraction and prediction and sums the
disjoint rows back with ``all_reduce``, and only rank 0 writes checkpoints. The pipelines run their data
stages (audit, splits, features) on rank 0 first (:func:`main_first`): the other ranks then read the cached
results, so every rank sees identical inputs. All ranks must see the same run folder (one machine, or a
shared file system across nodes).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


_local_depth = 0  # > 0 inside main_first(): the ranks run the block one after another, so no collectives


def _real_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_size() -> int:
    """Processes working together right now (1 inside a :func:`main_first` block)."""
    return 1 if _local_depth else _real_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> bool:
    """Join the process group when launched by torchrun; return True when running distributed."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("DDP: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world_size() > 1 else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first; the other ranks wait, then run it (reusing rank 0's cached files).

    Inside the block every rank works alone (:func:`world_size` is 1), so code in it that would otherwise
    shard work or call collectives (which would deadlock while the other ranks wait) runs locally."""
    global _local_depth
    real = _real_world_size() > 1 and _local_depth == 0
    if real and not is_main():
        dist.barrier()
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1
        if real and is_main():
            dist.barrier()


def sum_rows(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a tensor whose rows were filled disjointly by the ranks."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (control-flow decisions such as early stopping must
    agree across ranks, or the next collective deadlocks; floating-point results may differ in the last bits)."""
    if world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
