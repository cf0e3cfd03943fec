"""`medssl serve` in headless Chromium, end to end on a small demo archive (embedded by `medssl embed`): the
page loads, a search opened by link (#key=..., the same function a click calls) shows neighbours with
thumbnails and distances, the screenshot is not blank, the console has no errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image

from medssl.cli import main
from medssl.retrieval.embed import read_embeddings
from medssl.retrieval.index import open_index
from medssl.retrieval.server import make_server
from test_retrieval import demo, isolated_row  # noqa: F401  (demo: the session fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# A closed network: nothing may be fetched at run time, and no profile outside the test's folder.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--window-size=1280,1000"]
K = 12  # page.js asks for this many neighbours


@pytest.fixture
def served(demo, tmp_path):  # noqa: F811
    """`medssl embed` through the CLI, then the server on a free port."""
    out = tmp_path / "embeddings"
    assert main(["embed", str(demo["shards"]), "--run", str(demo["run"]), "--out", str(out), "--quiet"]) == 0
    server = make_server(open_index(out, log=lambda m: None), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def test_page_shows_the_nearest_cases_in_chromium(served, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/setup.sh does it as root)")
    embeddings, url = served
    table = read_embeddings(embeddings, ["key"])
    key = table.column("key")[isolated_row(embeddings)].as_py()
    page = f"{url}/#key={key}"

    dom = _chromium(tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-3000:]
    html = dom.stdout
    neighbours = re.findall(r'<div class="card neighbour" data-row="(\d+)"[^>]*>(.*?)</div></div>', html)
    assert len(neighbours) == K, html[-3000:]
    first = neighbours[0][1]
    assert key in first and "distance 0.0000" in first   # the sample itself, nearest
    distances = [float(d) for d in re.findall(r"distance (\d+\.\d+)", html)]
    assert distances == sorted(distances) and len(distances) == K
    assert len(re.findall(r'<img src="/thumb/\d+\.png"', html)) >= K + 24  # results and the archive grid
    assert re.search(r"\d+ images indexed", html) and 'id="error" role="alert"></div>' in html
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    shot = tmp_path / "page.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", page)
    assert result.returncode == 0 and shot.exists(), result.stderr[-3000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05, "the screenshot is (nearly) blank"
    # The results column holds dark thumbnails (medical images on black): its right half is not plain white.
    assert (pixels[200:, pixels.shape[1] // 2:] < 60).mean() > 0.05
