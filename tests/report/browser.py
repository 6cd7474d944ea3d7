"""A real headless browser for the report tests: Debian's chromium, installed when missing (apt-get, as
root), else the tests that need it are skipped with the reason.

`load_in_browser(page)` loads a copy of the page with a checking script appended (the page itself has no
script), lets chromium run it (`--dump-dom` after `--virtual-time-budget`), and returns what the script saw:
per image whether it loaded and its natural and rendered size, the resources the page fetched, and the
JavaScript errors, plus chromium's console lines about errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_TIMEOUT_S = 900

_CHECK = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const images = Array.from(document.images).map(i => {
    const r = i.getBoundingClientRect();
    return {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
            width: r.width, height: r.height};
  });
  const resources = performance.getEntriesByType('resource').map(e => e.name);
  const out = document.createElement('pre');
  out.id = '__ternqc_check';
  out.textContent = JSON.stringify({images, resources, errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


def _find() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _install() -> str:
    """apt-get install chromium; the reason it could not, or ''."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)} failed: {exc}"
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return ""


@pytest.fixture(scope="session", name="chromium")
def chromium_fixture() -> str:
    """The path of a chromium executable; installs Debian's package when none is found, else skips."""
    found = _find()
    if found is None:
        why = _install()
        found = _find()
        if found is None:
            pytest.skip(
                f"no headless browser (chromium) and it could not be installed: {why or 'not found after install'}"
            )
    return found


def load_in_browser(chromium: str, page: Path, workdir: Path) -> dict[str, Any]:
    """Load `page` (a copy with the checking script) in headless chromium; return what the script saw and
    `console`: chromium's log lines that report a page error."""
    text = page.read_text(encoding="utf-8")
    assert "</body>" in text
    probe = workdir / f"probe-{page.name}"
    probe.write_text(text.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={workdir / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,1000",
        "--virtual-time-budget=15000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="__ternqc_check">(.*?)</pre>', done.stdout, re.S)
    assert match, "the checking script did not run: " + done.stdout[-500:] + done.stderr[-1000:]
    import html

    seen = json.loads(html.unescape(match.group(1)))
    seen["console"] = [
        line
        for line in done.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Failed to load" in line
    ]
    return seen


def screenshot(chromium: str, page: Path, png: Path, *, width: int = 1280, height: int = 2000) -> None:
    """A PNG of the top of `page` (for looking at it, and for the README)."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={png.parent / 'chromium-profile'}",
        f"--window-size={width},{height}",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=180, check=True)
