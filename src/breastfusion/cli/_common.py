"""Shared by the command groups: exit codes, the CLI logger, config arguments, torch threads."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("breastfusion.cli")

EXIT_ERROR = 2  # an error message on stderr, or nothing was produced (every item skipped)
EXIT_INTERRUPTED = 130


def _common_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.stage2_epochs=5 (repeatable)")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
