"""What a run folder's reusable outputs were made from, so that ``--resume`` never mixes settings.

``resume`` reuses every finished output (splits, out-of-fold predictions, fold checkpoints, bundles). Reusing
one made under other settings (another seed, fold count, image size, cases table ...) would give a report that
claims the new settings over old results. So each run writes ``fingerprints.json``: per stage, the settings the
stage depends on and a digest of the input tables. On resume, a stage whose outputs exist in the folder must
match; otherwise the run is refused with what changed (old → new) before anything is overwritten.

Settings that only change what is recomputed on every run anyway (the report, ``explain_cases``, ``threads``,
the path of the data source) are in no stage's list: they may change on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from breastfusion.config import Config, load_config
from breastfusion.data.cases import IMAGE_PATH, MASK_PATH, MASK_SEP
from breastfusion.errors import ConfigError
from breastfusion.utils import write_json

log = logging.getLogger(__name__)

FINGERPRINTS = "fingerprints.json"
FORMAT = 1
# Never part of a fingerprint: where the data lives (a moved folder is the same data: the table digest covers
# the content) and how many CPU threads to use.
IGNORED = ("data.source", "histology.tiles", "train.threads", "histology.workers", "histology.scheduler",
           "segmentation.threads", "segmentation.checkpoint_every")

# Keys added to the configuration after runs were recorded, with the value that does what those runs did. A
# recorded stage without the key matches a config holding that value (a run from before the key resumes); any
# other value is a change. A key whose default does something new (train.scanner_augment) is not listed here.
ADDED_LATER = {"data.importer": "auto", "data.masks": "expert", "image.clean": "none"}


@dataclass
class Stage:
    """A step whose outputs ``resume`` reuses: its ``keys`` (config keys or sections, dotted) and whether its
    ``outputs`` (shown to the user) are already in the run folder."""

    name: str
    outputs: str
    keys: tuple[str, ...]
    exists: bool
    exclude: tuple[str, ...] = ()


def flat_config(cfg: Config) -> dict:
    """Every config value under its dotted key (lists and mappings are values, not sections)."""
    out: dict = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key not in ("histology.backbones",):
                walk(v, key + ".")
            else:
                out[key] = v

    walk(cfg.model_dump(mode="json"), "")
    return out


def stage_settings(flat: dict, stage: Stage) -> dict:
    def wanted(key: str) -> bool:
        def under(prefixes) -> bool:
            return any(key == p or key.startswith(p + ".") for p in prefixes)
        return under(stage.keys) and not under(stage.exclude) and not under(IGNORED)

    return {k: v for k, v in flat.items() if wanted(k)}


def table_digest(table: pd.DataFrame, path_columns: tuple[str, ...] = (IMAGE_PATH, MASK_PATH)) -> str:
    """SHA-256 of a cases/tiles table's content. File paths count by file name and size, not by folder, so a
    moved data folder is the same data while a renamed, replaced or re-ordered file is not."""
    df = table.copy()
    for col in path_columns:
        if col in df.columns:
            df[col] = [_file_token(v) for v in df[col]]
    h = hashlib.sha256()
    h.update(df.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return h.hexdigest()[:16]


def _file_token(value) -> str:
    if not isinstance(value, str) or not value.strip():
        return ""
    parts = []
    for p in (s.strip() for s in value.split(MASK_SEP) if s.strip()):
        try:
            size = os.stat(p).st_size
        except OSError:
            size = -1
        parts.append(f"{os.path.basename(p)}:{size}")
    return MASK_SEP.join(parts)


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED)


def _changes(old: dict, new: dict) -> list[str]:
    """``key: old → new`` for each setting that differs; keys that never count (IGNORED, e.g. thread counts) are
    skipped on both sides, so a run recorded before such a key was ignored still resumes; a key added later
    (ADDED_LATER) at the value that does what the old run did is no change."""
    out = []
    for k in sorted(k for k in set(old) | set(new) if not _ignored(k)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if k not in old and k in ADDED_LATER and b == ADDED_LATER[k]:
            continue
        if a != b:
            out.append(f"{k}: {_short(a)} → {_short(b)}")
    return out


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


def _load(run_dir: Path) -> dict | None:
    path = run_dir / FINGERPRINTS
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["stages"] if isinstance(data.get("stages"), dict) else {}
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"'{path}' is unreadable ({exc}); cannot tell what settings made the outputs in "
                          f"'{run_dir}'. Use a new run folder, or run without --resume to recompute them.") from None


def _legacy(run_dir: Path, cfg: Config, stages: list[Stage]) -> dict:
    """A run folder from before fingerprints: compare with the config it saved (the tables cannot be checked)."""
    path = run_dir / "config.yaml"
    log.warning("resume: '%s' has no %s (made by an older version): checking the saved config.yaml only; "
                "a changed cases table cannot be detected", run_dir, FINGERPRINTS)
    if not path.exists():
        return {}
    try:
        old = flat_config(load_config(path))
    except ConfigError as exc:
        raise ConfigError(f"resume: the saved '{path}' is no longer a valid configuration ({exc}); cannot tell "
                          "what settings made the outputs there. Use a new run folder, or run without --resume.") from None
    return {s.name: {"settings": stage_settings(old, s), "data": None} for s in stages}


def check_and_record(run_dir: str | Path, cfg: Config, stages: list[Stage], data: dict[str, str], *,
                     resume: bool) -> None:
    """On ``resume``, refuse (ConfigError) if a stage whose outputs exist was made under other settings or other
    input tables; then record the current fingerprints (stages not in ``stages`` keep theirs)."""
    run_dir = Path(run_dir)
    flat = flat_config(cfg)
    current = {s.name: {"settings": stage_settings(flat, s), "data": data} for s in stages}
    stored = _load(run_dir)
    if resume and any(s.exists for s in stages):
        old_all = stored if stored is not None else _legacy(run_dir, cfg, stages)
        changed_keys: dict[str, None] = {}
        affected = []
        for s in stages:
            old = old_all.get(s.name)
            if not s.exists:
                continue
            if old is None:
                log.warning("resume: %s in '%s' has no recorded settings; it is reused unchecked", s.outputs, run_dir)
                continue
            diffs = _changes(old.get("settings", {}), current[s.name]["settings"])
            if old.get("data") is not None:
                diffs += [f"the {k} table changed (content digest {old['data'].get(k)} → {v})"
                          for k, v in data.items() if old["data"].get(k) != v]
            if diffs:
                changed_keys.update(dict.fromkeys(diffs))
                affected.append(s.outputs)
        if affected:
            raise ConfigError(
                f"Cannot resume in '{run_dir}': its outputs were made under other settings:\n  "
                + "\n  ".join(changed_keys) + "\nOutputs that would be reused: " + ", ".join(affected)
                + ". Reusing them would mix results of different settings while the report claims the new ones. "
                  "Write to a new run folder (--out), or run without --resume to recompute everything here "
                  "(or resume with the old settings).")
    merged = dict(stored or {})
    merged.update(current)
    write_json({"format": FORMAT, "stages": merged}, run_dir / FINGERPRINTS)
