"""Command line: a thin layer over the Python API.

``build_parser`` makes the top parser and lets each command-group module (``experiment``, ``data``, ``predict``,
``evaluate``, ``segment``, ``nuclei``) add its subcommands; ``main`` runs one and turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from breastfusion.cli import data, evaluate, experiment, nuclei, predict, segment
from breastfusion.cli._common import EXIT_ERROR, EXIT_INTERRUPTED
from breastfusion.errors import BreastfusionError

# the subcommands, in the order `breastfusion --help` lists them, and the group module that adds each
_COMMANDS = (
    ("demo", experiment), ("audit", data), ("train", experiment), ("predict", predict), ("export", predict),
    ("explain", predict), ("serve", predict), ("tile", data), ("nuclei", nuclei), ("segment", segment),
    ("features", data), ("config", experiment), ("calibrate", evaluate), ("validate", evaluate),
    ("synthetic", experiment),
)


def build_parser() -> argparse.ArgumentParser:
    from breastfusion.version import __version__

    parser = argparse.ArgumentParser(
        prog="breastfusion", description="Multimodal breast-cancer classifiers.",
        epilog=f"exit codes: 0 done (skipped items, if any, are listed on stderr and in a .skipped.csv); "
               f"{EXIT_ERROR} an error (one line on stderr) or nothing produced (every item skipped); "
               f"{EXIT_INTERRUPTED} interrupted.")
    parser.add_argument("--version", action="version", version=f"breastfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, group in _COMMANDS:
        group.add_parsers(sub, [name])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("radiomics", "timm", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except BreastfusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a path the user gave: missing, read-only, a file where a folder is needed, ...
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _os_error_message(exc: OSError) -> str:
    """One line for a file-system error: what went wrong, on which path, and the file in the way if any."""
    what = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    msg = f"{what}: " + " -> ".join(f"'{n}'" for n in names) if names else what
    if names and isinstance(exc, (FileExistsError, NotADirectoryError)):
        p = Path(names[0])
        blocker = next((a for a in (p, *p.parents) if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            msg += f" ('{blocker}' is a file where a folder is needed)"
    elif isinstance(exc, PermissionError):
        msg += " (is the folder writable?)"
    return msg
