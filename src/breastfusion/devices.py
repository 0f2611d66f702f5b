"""Where tensors run and how many CPU threads they use: one rule for training, prediction and segmentation.

:func:`select_device` turns a device setting (``"auto"``, ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
:class:`torch.device`) into a :class:`torch.device`; :func:`configure_threads` sets PyTorch's intra-op threads.
Both know about processes started together by ``torchrun`` (see :mod:`breastfusion.distributed`).
"""

from __future__ import annotations

import os

import torch

from breastfusion import distributed as dist_utils
from breastfusion.errors import ConfigError


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` or ``None``: the GPU when CUDA is available (under torchrun, this process's ``LOCAL_RANK`` GPU;
    otherwise the current one), else the CPU. Anything else is taken as asked; a CUDA device without CUDA is a
    :class:`ConfigError`."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", "0")) if dist_utils.world_size() > 1 else torch.cuda.current_device()
            return torch.device("cuda", index)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was requested but CUDA is not available; use 'cpu' or 'auto'.")
    return dev


def configure_threads(threads: int | None) -> None:
    """Use every core for intra-op work on CPU (PyTorch's default can be lower in containers); processes
    started together by torchrun share the cores instead of each taking all of them (oversubscription makes
    CPU training many times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or max(1, cores // dist_utils.local_world_size())
    torch.set_num_threads(max(1, int(n)))
