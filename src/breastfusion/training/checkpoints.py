"""Resumable training checkpoints, one format for every trainer that keeps its own loop (lesion segmenter,
nuclei segmenter): the weights (``model.*``), the optimiser's moments (``opt.<param>.<name>``) and named extra
tensor groups (``<group>.*``, e.g. the best weights so far) in one safetensors file (no pickle: loading runs no
code), with a JSON entry under ``key`` whose ``fingerprint`` must match for the checkpoint to be used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from breastfusion.errors import BundleError
from breastfusion.utils import atomic_path, read_safetensors, state_tensors

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, info: dict, *, key: str,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write the checkpoint atomically (a kill never leaves half a file)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in state_tensors(net).items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1).contiguous().clone()
    for group, part in (extra or {}).items():
        for k, v in (part or {}).items():
            tensors[f"{group}.{k}"] = v
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(info)})


def load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, fingerprint: str, *,
                    key: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
    """Restore the weights and the optimiser's moments; return the info entry and the extra tensor groups. None
    (and a log line) when the checkpoint is unreadable or was made with other data or settings."""
    try:
        tensors, raw = read_safetensors(path, "Checkpoint")
        info = json.loads(raw[key])
    except (BundleError, KeyError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable checkpoint '%s' (%s); training starts from scratch", path, exc)
        return None
    if info.get("fingerprint") != fingerprint:
        log.warning("checkpoint '%s' was made with other data or settings; training starts from scratch", path)
        return None
    dev = next(net.parameters()).device
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict = {}
    extra: dict[str, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        group, _, rest = name.partition(".")
        if group == "opt":
            idx, _, moment = rest.partition(".")
            p = params[int(idx)]
            state.setdefault(int(idx), {})[moment] = v.reshape(()) if moment == "step" else v.reshape(p.shape).to(dev)
        elif group != "model":
            extra.setdefault(group, {})[rest] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return info, extra
