"""`medssl serve` through its CLI against what browsers and attackers send: lying body lengths, bursts of
connections, clients that go away, and uploads that once hung a decoder or were misread (NIfTI under any
name). The server must answer each with a clear status, stay up, and print no traceback."""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.cli import main
from test_retrieval import demo  # noqa: F401  (the session fixture: a small archive, pretrained)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("serve") / "embeddings"
    assert main(["embed", str(demo["shards"]), "--run", str(demo["run"]), "--out", str(out), "--quiet"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "medssl.cli", "serve", "--index", str(out), "--port", "0",
                             "--max-upload-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (found := re.search(r"serving .* on http://localhost:(\d+)/", proc.stdout.readline())):
        assert proc.poll() is None, proc.communicate()
    port = int(found.group(1))
    state = {"port": port, "url": f"http://127.0.0.1:{port}", "proc": proc, "index": out}
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/search?k=3", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_negative_content_length_is_refused(server):
    """Content-Length: -1 bypassed --max-upload-mb (a 600 MB body took the server from 1.1 to 2.3 GB)."""
    answer = _raw(server["port"], b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n"
                                  b"Connection: close\r\n\r\n" + b"\0" * 4096)
    assert answer.startswith(b"HTTP/1.1 400")


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    started = time.monotonic()
    answer = _raw(server["port"], b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 600000000\r\n"
                                  b"Connection: close\r\n\r\n" + b"\0" * 1024)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    status, body = _post(server["url"], b"\0" * (1 << 20) + b"\0" * 1000)  # just over: the page's message
    assert status == 413 and "the limit is 1 MB" in body["error"]


def test_a_burst_of_connections_is_answered_not_reset(server):
    """The listen backlog was 5: 87 of 200 burst connections were reset."""

    def info(_):
        with urllib.request.urlopen(f"{server['url']}/api/info", timeout=60) as response:
            return response.status

    with ThreadPoolExecutor(200) as pool:
        assert list(pool.map(info, range(200))) == [200] * 200


def test_clients_that_go_away_cost_nothing(server):
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", server["port"])) as s:
            s.sendall(b"GET /api/samples?count=200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not a close
    with urllib.request.urlopen(f"{server['url']}/api/info", timeout=60) as response:
        assert response.status == 200


def test_a_nifti_upload_is_read_whatever_its_name(server, tmp_path):
    """Every NIfTI upload failed: saved as "upload", nibabel could not tell its type by the name."""
    volume = np.random.default_rng(0).normal(100, 20, (24, 24, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    status, body = _post(server["url"], (tmp_path / "v.nii.gz").read_bytes())
    assert status == 200, body
    assert len(body["neighbours"]) == 3


def test_a_jp2_box_loop_upload_fails_at_once_and_holds_no_lock(server, tmp_path):
    """A JP2 box of length 0 made pydicom loop: 60 s holding the upload lock."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "JPEG2000.dcm")
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x00ftyp" + codestream])
    ds.save_as(tmp_path / "loop.dcm")
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_post, server["url"], (tmp_path / "loop.dcm").read_bytes())
        good = pool.submit(_post, server["url"], (Path(pydicom.__file__).parent / "data" / "test_files"
                                                  / "CT_small.dcm").read_bytes())
        (bad_status, bad_body), (good_status, _) = bad.result(), good.result()
    assert bad_status == 422 and "decode_failed" in bad_body["error"] and "JP2 box" in bad_body["error"]
    assert good_status == 200 and time.monotonic() - started < 30


def test_ctrl_c_stops_a_server_whose_parent_ignores_sigint(server):
    """A parent that ignores SIGINT (a job runner, a shell's background job, a test session) passes that on,
    and Python then installs no SIGINT handler: the server never stopped on Ctrl-C (found as a CI run where
    the test below waited out its timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "medssl.cli", "serve", "--index", str(server["index"]), "--port",
                             "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        while "serving" not in proc.stdout.readline():
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_server_printed_no_traceback(server):
    """Runs last in this module (pytest keeps file order): after every test above, stop the server and read
    its stderr. A client that went away printed 345 BrokenPipe tracebacks before."""
    server["proc"].send_signal(signal.SIGINT)
    _, err = server["proc"].communicate(timeout=30)
    assert server["proc"].returncode == 0
    assert "Traceback" not in err, err[-3000:]
    for line in err.splitlines():
        assert re.match(r"(127\.0\.0\.1 (GET|POST) \S* \d{3} \d+ ms|medssl serve: .+)$", line), line
