"""Small shared helpers: atomic writes, seeding, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def stable_seed(seed: int, *parts) -> int:
    """A seed in [0, 2**31) derived from ``seed`` and ``parts`` (model name, fold, ...) by SHA-256.

    Each fold's network, inner split and augmentation start from ``stable_seed(seed, model, fold)`` rather than
    from the global random state, which depends on what ran before in this process: a run resumed between folds
    then repeats an uninterrupted one. (Python's ``hash()`` of a string is salted per process, so not that.)
    """
    text = "\x1f".join(str(p) for p in (int(seed), *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") >> 1


# atomic_path's temporary names: "." + final name + "." + mkstemp's 8 random characters + ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` leaves when its process is killed (SIGKILL gives no
    chance to clean up) anywhere under ``folder``; return them. Call only when no other process writes there
    (at the start of a run, on the main rank)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob("*.tmp"):
        if _TMP_NAME.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s: %s", len(removed), folder,
                 ", ".join(str(p.relative_to(folder)) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving; the smaller root wins, so results do not depend on order)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def read_safetensors(path: Path, what: str) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a safetensors file (no pickle: loading runs no code); BundleError naming the file
    when it is missing, not a regular file, foreign or corrupt. ``what`` names it in messages ("Model file")."""
    from safetensors import safe_open

    from breastfusion.errors import BundleError

    path = Path(path)
    if not path.exists():
        raise BundleError(f"{what} not found: '{path}'.")
    if not path.is_file():
        raise BundleError(f"{what} '{path}' is not a regular file.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt or foreign files
        raise BundleError(f"Cannot read {what.lower()} '{path}': not a valid safetensors file, or corrupt/truncated "
                          f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
    return tensors, meta


def model_file_meta(raw: dict, path: Path, *, meta_key: str, ckpt_key: str, what: str) -> dict:
    """The JSON metadata entry ``meta_key`` of a breastfusion safetensors model file (``raw``: its metadata);
    BundleError naming the file for a training checkpoint (``ckpt_key``), a foreign file or unreadable JSON.
    ``what`` names the kind of model in messages ("Nuclei model", "Lesion segmenter")."""
    from breastfusion.errors import BundleError

    if meta_key not in raw:
        if ckpt_key in raw:
            raise BundleError(f"'{path}' is a training checkpoint, not a finished {what.lower()}: re-run the "
                              "training (it resumes) to finish it.")
        raise BundleError(f"'{path}' is a safetensors file but not a breastfusion {what.lower()} "
                          f"(no '{meta_key}' metadata entry).")
    try:
        meta = json.loads(raw[meta_key])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{what} '{path}' has unreadable metadata JSON ({exc}).") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{what} '{path}' has metadata that is not a JSON object.")
    return meta


def state_tensors(net) -> dict:
    """A network's state as detached, contiguous CPU copies (what a safetensors file stores)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def lazy_exports(package: str, exports: dict):
    """``__getattr__`` and ``__dir__`` for a package that hands on names from its modules, imported on first use
    (so importing the package stays light). ``exports``: name → submodule of ``package`` holding that name, or
    name → ``(module, attribute)`` with a full module name (attribute ``None``: the module itself)."""
    import importlib
    import sys

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = exports[name]
        module, attr = (f"{package}.{where}", name) if isinstance(where, str) else where
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        sys.modules[package].__dict__[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(sys.modules[package].__dict__) | set(exports))

    return __getattr__, __dir__


def load_checked_weights(net, tensors: dict, path: Path, what: str) -> None:
    """Load a model file's ``tensors`` into ``net`` (every tensor, no other) and refuse non-finite weights;
    BundleError naming the file otherwise."""
    import torch

    from breastfusion.errors import BundleError

    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"Weights in '{path}' do not match the architecture in its metadata: {str(exc)[:300]}") from exc
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise BundleError(f"{what} '{path}' holds non-finite weights.")

