"""Check in headless Chromium that every image of a `cpt compare` page decodes.

    python scripts/check_compare_html.py compare/index.html [--chromium /usr/bin/chromium] [--screenshot page.png]

A copy of the page gets a small script that, once the page has loaded, writes each image's
``naturalWidth`` into ``document.title``; ``--dump-dom`` prints the DOM after load and the title is
read back from it. An image that did not decode has width 0. Exits 0 when all decoded, 1 when one did
not, and 0 with a SKIP line when Chromium is not installed (so CI without a browser stays green).
``--screenshot`` also saves the rendered page as a PNG (full height), to look at.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", () => {
  const w = Array.from(document.images).map(img => img.complete ? img.naturalWidth : 0);
  document.title = "IMGCHECK:" + w.join(",") + ":END";
});
</script>"""


def find_chromium(given: str | None) -> str | None:
    if given:
        return given if Path(given).is_file() else None
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--chromium", default=None, help="browser binary (default: /usr/bin/chromium, then PATH)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save the rendered page as this PNG")
    args = ap.parse_args()

    if not args.html.is_file():
        print(f"FAIL: {args.html}: no such page (write one with cpt compare RUN... --out DIR)")
        return 1
    page = args.html.read_text(encoding="utf-8")
    expected = len(re.findall(r"<img\b", page))
    browser = find_chromium(args.chromium)
    if browser is None:
        print("SKIP: Chromium not installed (looked for /usr/bin/chromium, chromium, chromium-browser, "
              "google-chrome); the images were not checked in a browser")
        return 0
    with tempfile.TemporaryDirectory(prefix="cpt-html-check-") as tmp:
        probe_page = Path(tmp) / "page.html"
        probe_page.write_text(page.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={Path(tmp) / 'profile'}",
               "--virtual-time-budget=5000",  # let the load event and the script run before the dump
               "--dump-dom", probe_page.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if args.screenshot is not None:
                shot = [*cmd[:-2], "--hide-scrollbars", "--window-size=1280,4000",
                        f"--screenshot={args.screenshot.resolve()}", probe_page.as_uri()]
                subprocess.run(shot, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"FAIL: Chromium did not finish within {args.timeout:g} s")
            return 1
    m = re.search(r"IMGCHECK:([0-9,]*):END", proc.stdout)
    if m is None:
        print(f"FAIL: no result in Chromium's DOM dump (exit {proc.returncode}); stderr:\n{proc.stderr[-2000:]}")
        return 1
    widths = [int(w) for w in m.group(1).split(",") if w]
    broken = [i for i, w in enumerate(widths) if w == 0]
    if len(widths) != expected or broken:
        print(f"FAIL: {len(widths)} of {expected} images seen; not decoded: {broken}")
        return 1
    print(f"OK: {len(widths)} images decoded (widths {', '.join(map(str, widths))} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
