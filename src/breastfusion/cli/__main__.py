"""``python -m breastfusion.cli`` (e.g. ``torchrun -m breastfusion.cli train ...``)."""

from breastfusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
