"""Takes the README's screenshot of the live whiteboard: `whiteboard serve` on the demo's
models, the seed's sentence, the board at the word "France", headless Chromium.

    make demo && .venv/bin/python docs/explorer_screenshot.py --out docs/images/explorer.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=[f"demo-out/models/{c}" for c in ("rnn", "lstm", "gru")])
    parser.add_argument("--out", type=Path, default=Path("docs/images/explorer.png"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "whiteboard", "serve", *args.runs, "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1500})
            page.goto(url)
            page.wait_for_selector("body[data-ready=yes]")
            page.wait_for_selector(".reach-row .reach-tok")
            page.wait_for_selector("#distance-chart polyline.curve", state="attached")
            page.hover(".model-row[data-model=lstm] .tok[data-index='3']")
            page.wait_for_selector("body[data-board='lstm:0:3']")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
