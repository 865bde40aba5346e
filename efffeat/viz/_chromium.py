"""Rendering a report in headless Chromium: screenshots, the DOM after scripts ran, and the console's messages.

Used by the browser test and by ``scripts/make_screenshots.py``; nothing in the library needs a browser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--enable-logging=stderr",
    "--v=0",
)
# Chromium logs every console message of the page as "...:INFO:CONSOLE(...)" or "...:INFO:CONSOLE:line] ...".
_CONSOLE = re.compile(r":CONSOLE[(:]")


@dataclass(frozen=True)
class Rendered:
    """What one headless run produced: stdout (the DOM with ``dump_dom``) and the page's console lines."""

    stdout: str
    console: list[str]


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable (``$CHROMIUM`` first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(
    html_path: str | os.PathLike,
    *,
    screenshot: str | os.PathLike | None = None,
    dump_dom: bool = False,
    size: tuple[int, int] = (1280, 2000),
    budget_ms: int = 10_000,
    timeout_s: float = 120.0,
    chromium: str | None = None,
) -> Rendered:
    """Open `html_path` in headless Chromium, let its scripts run for `budget_ms` of virtual time, and either
    save a PNG `screenshot` of a ``size = (width, height)`` window or return the DOM (`dump_dom`)."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found; install it (apt-get install chromium) or set $CHROMIUM")
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="efffeat-chromium-") as profile:
        args = [exe, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        args.append(f"--virtual-time-budget={budget_ms}")
        if screenshot is not None:
            args.append(f"--screenshot={Path(screenshot).resolve()}")
        if dump_dom:
            args.append("--dump-dom")
        done = subprocess.run(args + [url], capture_output=True, text=True, timeout=timeout_s, cwd=profile)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"chromium exited with {done.returncode}: {tail}")
    console = [line for line in done.stderr.splitlines() if _CONSOLE.search(line)]
    return Rendered(done.stdout, console)
