"""``medssl serve``: a local web page to find the cases nearest to an archive image or an uploaded one.

Standard library only (``http.server``): one page (``page.html`` + ``page.js``) and a small JSON API.

    GET  /                          the page
    GET  /api/info                  what is indexed: rows, modalities, encoder
    GET  /api/samples?start=&count=&modality=   archive images to pick from
    GET  /api/search?row=N|key=K&k=10           the nearest cases of an indexed sample
    POST /api/search?k=10           body: an image file (PNG, JPEG, TIFF, DICOM, NIfTI), at most max_upload_mb
    GET  /thumb/N.png               a thumbnail of indexed row N, rendered from its shard's pixels

Bound to 127.0.0.1 by default: the page shows archive images, so it is for the user's own machine; on a
loopback address requests must also name a loopback host (a web page elsewhere cannot reach it through
DNS rebinding). Requests name rows by number or key, never by path, so nothing outside the index can be
read. Answers hold keys (content hashes), modality codes, frame numbers and distances; no header values.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from medssl.intensity import to_display
from medssl.io import Rejected
from medssl.io.isolation import Budget
from medssl.retrieval.embed import Encoder
from medssl.retrieval.files import decode_file
from medssl.retrieval.index import SearchIndex
from medssl.retrieval.thumbnails import png, shard_sample_pixels

MAX_K = 100
MAX_PAGE = 200
# An interactive request should fail in seconds, not in ingest's five minutes.
UPLOAD_BUDGET = Budget(timeout_s=60.0, memory_bytes=2 << 30)
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8")}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


class RequestError(Exception):
    """A request the user can fix: answered with ``status`` and the message as JSON ``{"error": ...}``."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class SearchApp:
    """What the handler needs: the index, the encoder (loaded at the first upload) and the thumbnails."""

    def __init__(self, index: SearchIndex, max_upload_mb: float = 32.0):
        self.index = index
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.ct_window = tuple(index.manifest["ct_window"])
        self._encoder: Encoder | None = None
        # The decode worker (one per process) and the encoder serve one request at a time.
        self._lock = threading.Lock()
        self._modalities = np.asarray(index.rows.column("modality").to_pylist(), dtype=object)

    def info(self) -> dict:
        names, counts = np.unique(self._modalities.astype(str), return_counts=True)
        m = self.index.manifest
        return {"rows": self.index.count, "modalities": dict(zip(names.tolist(), counts.tolist())),
                "encoder": m["encoder"], "library": self.index.library, "max_upload_mb": self.max_upload_mb}

    def samples(self, start: int, count: int, modality: str | None) -> dict:
        rows = np.arange(self.index.count) if not modality else np.flatnonzero(self._modalities == modality)
        page = rows[start:start + min(count, MAX_PAGE)]
        return {"total": len(rows), "start": start, "rows": [self._card(int(i)) for i in page]}

    def search_row(self, row: int, k: int) -> dict:
        if not 0 <= row < self.index.count:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no row {row}: the index has rows 0 to {self.index.count - 1}")
        return {"query": self._card(row), "neighbours": self._neighbours(self.index.vector(row), k)}

    def search_key(self, key: str, k: int) -> dict:
        row = self.index.find_key(key)
        if row is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no sample with key {key!r} in the index")
        return self.search_row(row, k)

    def search_upload(self, data: bytes, k: int) -> dict:
        """An uploaded image: decoded by medssl's readers in a decode worker, encoded, searched."""
        with tempfile.TemporaryDirectory(prefix="medssl-upload-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            try:
                with self._lock:
                    decoded, vector = self._get_encoder().encode_file(path, UPLOAD_BUDGET)
            except Rejected as r:
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                                   f"the uploaded file could not be read as an image ({r.code}): {r.detail}") from None
        thumbnail = png(to_display(decoded.values, decoded.is_ct, self.ct_window))
        query = {"row": None, "key": decoded.key, "modality": decoded.modality, "frame": decoded.frame,
                 "thumbnail": "data:image/png;base64," + base64.b64encode(thumbnail).decode()}
        return {"query": query, "neighbours": self._neighbours(vector, k)}

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one app per server, kept for the server's life)
    def thumbnail(self, row: int) -> bytes:
        if not 0 <= row < self.index.count:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no row {row}")
        r = self.index.row(row)
        if r["shard"] is not None:
            values, is_ct = shard_sample_pixels(self.index.manifest["source"]["dataset"], r["shard"], r["offset"])
        else:  # an embedded image file: decoded again, pixels only
            with self._lock:
                decoded = decode_file(Path(r["path"]), self._get_encoder().decode_settings(), UPLOAD_BUDGET)
            values, is_ct = decoded.values, decoded.is_ct
        return png(to_display(values, is_ct, self.ct_window))

    def _get_encoder(self) -> Encoder:
        """Loaded at the first upload (callers hold the lock): browsing the archive needs no encoder."""
        if self._encoder is None:
            m = self.index.manifest
            self._encoder = Encoder(m["run"], tuple(m["ct_window"]))
        return self._encoder

    def _card(self, row: int) -> dict:
        r = self.index.row(row)
        return {"row": row, "key": r["key"], "modality": r["modality"], "frame": r["frame"],
                "thumbnail": f"/thumb/{row}.png"}

    def _neighbours(self, vector: np.ndarray, k: int) -> list[dict]:
        return [{**self._card(row), "distance": round(distance, 6)} for row, distance in self.index.search(vector, k)]


class Handler(BaseHTTPRequestHandler):
    app: SearchApp          # set on the subclass that make_server builds
    loopback_only: bool
    server_version = "medssl-serve"
    quiet = False

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        try:
            self._check_host()
            status, body, content_type = route(urlsplit(self.path))
        except RequestError as e:
            status, body, content_type = e.status, _json({"error": str(e)}), "application/json"
        except Exception as e:  # a bug or a broken shard: say what failed, keep serving the other requests
            status, body, content_type = (HTTPStatus.INTERNAL_SERVER_ERROR,
                                          _json({"error": f"internal error ({type(e).__name__}): {e}"}),
                                          "application/json")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                    "style-src 'self' 'unsafe-inline'")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.loopback_only and name not in _LOOPBACK_NAMES:
            raise RequestError(HTTPStatus.FORBIDDEN, "this server answers requests for localhost only")

    def _get(self, url) -> tuple[HTTPStatus, bytes, str]:
        query = parse_qs(url.query)
        if url.path in _STATIC:
            name, content_type = _STATIC[url.path]
            return HTTPStatus.OK, resources.files("medssl.retrieval").joinpath(name).read_bytes(), content_type
        if url.path == "/api/info":
            return HTTPStatus.OK, _json(self.app.info()), "application/json"
        if url.path == "/api/samples":
            start, count = _int(query, "start", 0), _int(query, "count", 24)
            modality = query.get("modality", [""])[0] or None
            return HTTPStatus.OK, _json(self.app.samples(max(0, start), max(1, count), modality)), "application/json"
        if url.path == "/api/search":
            k = min(max(1, _int(query, "k", 10)), MAX_K)
            if "key" in query:
                return HTTPStatus.OK, _json(self.app.search_key(query["key"][0], k)), "application/json"
            return HTTPStatus.OK, _json(self.app.search_row(_int(query, "row", None), k)), "application/json"
        if url.path.startswith("/thumb/") and url.path.endswith(".png"):
            try:
                row = int(url.path[len("/thumb/"):-len(".png")])
            except ValueError:
                raise RequestError(HTTPStatus.NOT_FOUND, "thumbnails are /thumb/ROW.png") from None
            return HTTPStatus.OK, self.app.thumbnail(row), "image/png"
        raise RequestError(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def _post(self, url) -> tuple[HTTPStatus, bytes, str]:
        if url.path != "/api/search":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no page {url.path} to post to")
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.app.max_upload_bytes:
            self.close_connection = True  # the body is not read: the connection cannot carry another request
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the file is {length / (1 << 20):.2f} MB; the limit is {self.app.max_upload_mb:g} MB "
                               "(medssl serve --max-upload-mb)")
        if length == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the upload is empty: choose an image file")
        data = self.rfile.read(length)
        k = min(max(1, _int(parse_qs(url.query), "k", 10)), MAX_K)
        return HTTPStatus.OK, _json(self.app.search_upload(data, k)), "application/json"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.quiet:
            super().log_message(format, *args)


def _int(query: dict, name: str, default: int | None) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"missing parameter {name}")
        return default
    try:
        return int(values[0])
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"parameter {name} must be a whole number") from None


def _json(value) -> bytes:
    return json.dumps(value).encode()


def make_server(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 32.0,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A server ready to ``serve_forever()`` (port 0: any free port, see ``server.server_address``)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    handler = type("BoundHandler", (Handler,), {"app": SearchApp(index, max_upload_mb), "loopback_only": loopback,
                                                "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
