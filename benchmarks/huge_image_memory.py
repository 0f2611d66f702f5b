"""Peak memory of scoring one huge image: a 12000x12000 RGB PNG of a few MB (issue 9, item 8).

Each measurement runs in a fresh Python process: after its imports, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``, Linux) and the peak reached while scoring (``VmHWM``) minus the resident size
before it is what decoding and resizing the image cost:

* ``whole_image`` - the path prediction used before: decode, float32 RGB of the whole image, grey, uint8,
  resize (the code is copied here, so the figure stays comparable after the library changed);
* ``strips`` - :func:`breastfusion.data.cleaning.load_for_scoring` with the pixel cap lifted: grey computed in
  strips of ``STRIP_PIXELS`` pixels, identical values;
* ``capped`` - the same with the default cap (``MAX_SCORED_PIXELS``, as ``serve --max-pixels``): refused from
  the header, before any pixel is decoded.

The image is SYNTHETIC (smooth gradients and rings, so the PNG stays small, as a scan can). Run:

    python benchmarks/huge_image_memory.py --work /tmp/huge_image --side 12000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r'''
import json, sys, time
import numpy as np
from PIL import Image
from breastfusion.data.cleaning import load_for_scoring
from breastfusion.errors import DataError
Image.MAX_IMAGE_PIXELS = None
path, method, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak-RSS mark: the imports' peak must not hide the image's
base = status_kb("VmRSS")
t0 = time.perf_counter()
status = "scored"
if method == "whole_image":
    img = Image.open(path); img.load()
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    u8 = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = np.array(Image.fromarray(u8).resize((side, side), Image.Resampling.BICUBIC))
elif method == "strips":
    out = load_for_scoring(path, side, max_pixels=None)
else:
    try:
        load_for_scoring(path, side)
    except DataError as exc:
        status = "refused: " + str(exc)[:160]
seconds = time.perf_counter() - t0
peak = status_kb("VmHWM")
print(json.dumps({"method": method, "rss_before_mb": round(base / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
                  "added_peak_mb": round((peak - base) / 1024, 1), "seconds": round(seconds, 2), "status": status}))
'''


def make_image(path: Path, side: int) -> None:
    """A SYNTHETIC smooth RGB image, written as PNG (built in bands to keep this script's own memory low)."""
    import numpy as np
    from PIL import Image

    img = Image.new("RGB", (side, side))
    x = np.arange(side, dtype=np.float32)
    band = 1000
    for y0 in range(0, side, band):
        y = np.arange(y0, min(side, y0 + band), dtype=np.float32)[:, None]
        r = np.sqrt((x - side / 2) ** 2 + (y - side / 2) ** 2)
        rgb = np.stack([(x / side * 255) + 0 * y, (y / side * 255) + 0 * x, 128 + 100 * np.sin(r / 400)], axis=-1)
        img.paste(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), (0, y0))
    img.save(path, compress_level=9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/huge_image"))
    ap.add_argument("--side", type=int, default=12000)
    ap.add_argument("--model-side", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["capped", "strips", "whole_image"])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"synthetic_{args.side}.png"
    if not path.exists():
        t0 = time.perf_counter()
        make_image(path, args.side)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"image": str(path), "size": f"{args.side}x{args.side} RGB",
               "file_mb": round(path.stat().st_size / 1e6, 2), "runs": []}
    for method in args.methods:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), method, str(args.model_side)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
