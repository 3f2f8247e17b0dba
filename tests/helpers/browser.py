"""The report as a user sees it: Debian's Chromium (``make browser`` installs it), headless.

``screenshot`` renders a page to a PNG; ``probe`` loads a copy of the page with a short script appended that, once
the page has loaded, records what the browser made of it (each image decoded or not and its size, each legend
swatch's computed colour, each chart) and writes that as JSON into the page, which ``--dump-dom`` then prints. The
report itself carries no script: the probe is the test's, added to a copy.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]

PROBE = """<script>
window.addEventListener('load', () => {
  const block = (el) => { const b = el.closest('[data-image]'); return b ? b.dataset.image : null; };
  const out = {
    images: [...document.images].map((i) => ({
      panel: i.dataset.panel || null, image: block(i), decoded: i.complete && i.naturalWidth > 0,
      width: i.naturalWidth, height: i.naturalHeight, src: i.getAttribute('src'),
    })),
    swatches: [...document.querySelectorAll('.sw[data-class]')].map((s) => ({
      cls: Number(s.dataset.class), colour: getComputedStyle(s).backgroundColor, image: block(s),
      panel: s.closest('figure') ? 'classes' : 'gallery',
    })),
    charts: [...document.querySelectorAll('svg')].map((s) => ({
      label: s.getAttribute('aria-label'), rects: s.querySelectorAll('rect').length,
      width: s.getBoundingClientRect().width,
    })),
    headings: [...document.querySelectorAll('h2, h3')].map((h) => h.textContent),
    banner: document.querySelector('.banner') ? document.querySelector('.banner').textContent : null,
  };
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium not found: `make browser` installs Debian's package"
    return path


def _run(args: list[str], profile: Path, tries: int = 3) -> subprocess.CompletedProcess:
    """Chromium with the test's flags; a loaded machine can make headless Chromium exit early, so retried."""
    logs = []
    for attempt in range(tries):
        res = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}-{attempt}", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if res.returncode == 0 and (res.stdout or "--screenshot" in " ".join(args)):
            return res
        logs.append(f"rc {res.returncode}: {res.stderr[-800:]}")
    raise AssertionError("Chromium failed:\n" + "\n".join(logs))


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1200, 1600)) -> Path:
    for _ in range(3):
        _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.as_uri()], out.with_suffix(""))
        if out.exists():
            return out
    raise AssertionError(f"Chromium wrote no screenshot of {page}")


def probe(page: Path, work: Path) -> dict:
    """What Chromium made of ``page``: the probe's JSON (see the module's docstring)."""
    copy = work / f"probed-{page.name}"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    for _ in range(3):
        res = _run(["--dump-dom", copy.as_uri()], work / "profile")
        found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
        if found:
            return json.loads(html.unescape(found.group(1)))
    raise AssertionError(f"the probe found nothing in Chromium's DOM of {page}:\n{res.stdout[-2000:]}")
