"""Screenshot of a running station page for the README (headless Debian chromium, nothing downloaded).

lineinspect demo --keep-open 120 &     # prints the page's address
python docs/screenshot.py http://127.0.0.1:8080/ docs/station-live.png
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.edge_app.browser import make_driver  # noqa: E402


def main() -> int:
    url, out = sys.argv[1], Path(sys.argv[2])
    d = make_driver(1280, 900)
    try:
        d.get(url)
        end = time.monotonic() + 30
        while time.monotonic() < end:  # wait for a frame to be shown
            if d.execute_script("const i = document.querySelector('figure.cam img'); return i && i.naturalWidth"):
                break
            time.sleep(0.3)
        time.sleep(1.5)
        height = d.execute_script("return document.body.scrollHeight")
        d.set_window_size(1280, min(int(height) + 100, 2400))
        d.save_screenshot(str(out))
    finally:
        d.quit()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
