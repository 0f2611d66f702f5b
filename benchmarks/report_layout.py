"""How long and how wide is a run's HTML report at a laptop's width? (issue 9, item 11)

Opens ``report.html`` in headless Chromium (Playwright, Debian's ``/usr/bin/chromium``) at 1280 x 800 and records
the page's scroll height and width, the first section heading, and a screenshot of the first screen.

    python benchmarks/report_layout.py RUN/report/report.html [--png first_screen.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    if not Path(args.chromium).exists():
        print(f"skipped: no Chromium at {args.chromium} (apt-get install chromium)")
        return 0
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(args.report.resolve().as_uri())
        page.wait_for_timeout(500)
        out = page.evaluate("""() => ({
            height_px: document.documentElement.scrollHeight,
            width_px: document.documentElement.scrollWidth,
            first_heading: (document.querySelector('h2') || {}).textContent || null,
            images: document.images.length,
        })""")
        if args.png:
            page.screenshot(path=str(args.png))
        browser.close()
    out["report"] = str(args.report)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
