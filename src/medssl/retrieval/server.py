"""``medssl serve``: a local web page to find the cases nearest to an archive image or an uploaded one.

One page (``page.html`` + ``page.js``) and a small JSON API, as a WSGI app served by waitress:

    GET  /                          the page
    GET  /api/info                  what is indexed: rows, modalities, encoder
    GET  /api/samples?start=&count=&modality=   archive images to pick from
    GET  /api/search?row=N|key=K&k=10           the nearest cases of an indexed sample
    POST /api/search?k=10           body: an image file (PNG, JPEG, TIFF, DICOM, NIfTI), at most max_upload_mb
    GET  /thumb/N.png               a thumbnail of indexed row N, rendered from its shard's pixels

Why waitress and not ``http.server``: a server must hold against what browsers and attackers send. It
checks a body's declared length (digits only: ``Content-Length: -1`` is a 400) and refuses one over its
limit before reading it, bounds chunked bodies while reading, buffers large ones on disk, listens with a
deep backlog (a burst of connections waits instead of being reset) and closes a connection whose client
went away without a traceback. Uploads are decoded in decode workers (``medssl.io.isolation``) taken from
a small pool, with a short time budget, so a file that hangs its decoder costs its own request only.

Bound to 127.0.0.1 by default: the page shows archive images, so it is for the user's own machine; on a
loopback address requests must also name a loopback host (a web page elsewhere cannot reach it through
DNS rebinding). Requests name rows by number or key, never by path, so nothing outside the index can be
read. Answers hold keys (content hashes), modality codes, frame numbers and distances; no header values.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import json
import logging
import queue
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from medssl.intensity import to_display
from medssl.io import Rejected
from medssl.io.isolation import Budget, IsolatedWorker
from medssl.retrieval.embed import Encoder
from medssl.retrieval.files import decode_file
from medssl.retrieval.index import SAME, SearchIndex
from medssl.retrieval.thumbnails import png, shard_sample_pixels

MAX_K = 100
MAX_PAGE = 200
# An interactive request should fail in seconds, not in ingest's five minutes.
UPLOAD_BUDGET = Budget(timeout_s=15.0, memory_bytes=2 << 30)
THREADS = 4          # requests answered at once
DECODE_WORKERS = 2   # uploads decoded at once (each a process of ~200 MB)
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8")}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}
_HEADERS = [("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"),
            ("Cache-Control", "no-store")]


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
        self._encoder_lock = threading.Lock()  # held only while the encoder loads (once)
        self._workers: queue.Queue[IsolatedWorker] = queue.Queue()
        for _ in range(DECODE_WORKERS):
            self._workers.put(IsolatedWorker(UPLOAD_BUDGET, "medssl.retrieval.files"))  # started on first use
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
        return {"query": self._card(row), "neighbours": self._neighbours(self.index.vector(row), k, query_row=row)}

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
                with self._decode_worker() as worker:
                    decoded, vector = self._get_encoder().encode_file(path, UPLOAD_BUDGET, worker)
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
            with self._decode_worker() as worker:
                decoded = decode_file(Path(r["path"]), self._get_encoder().decode_settings(), UPLOAD_BUDGET, worker)
            values, is_ct = decoded.values, decoded.is_ct
        return png(to_display(values, is_ct, self.ct_window))

    @contextlib.contextmanager
    def _decode_worker(self):
        """A decode worker of the pool for one request (waiting if all are busy, as long as one decode may
        take): a slow or hanging file holds its own worker, never the server."""
        try:
            worker = self._workers.get(timeout=UPLOAD_BUDGET.timeout_s * 2)
        except queue.Empty:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "every decoder is busy: try again shortly") from None
        try:
            yield worker
        finally:
            self._workers.put(worker)

    def _get_encoder(self) -> Encoder:
        """Loaded at the first upload: browsing the archive needs no encoder. Inference needs no lock."""
        with self._encoder_lock:
            if self._encoder is None:
                m = self.index.manifest
                self._encoder = Encoder(m["run"], tuple(m["ct_window"]))
        return self._encoder

    def _card(self, row: int) -> dict:
        r = self.index.row(row)
        return {"row": row, "key": r["key"], "modality": r["modality"], "frame": r["frame"],
                "source": r.get("path"), "thumbnail": f"/thumb/{row}.png"}

    def _neighbours(self, vector: np.ndarray, k: int, query_row: int | None = None) -> list[dict]:
        """The nearest images (``SearchIndex.neighbours``: copies of one image folded into one card, with
        the other files under ``copies``). A search from an indexed image shows that image first, marked
        ``is_query``, whatever the order faiss gives rows tied at distance 0."""
        found = self.index.neighbours(vector, k, query_row)
        cards = []
        if query_row is not None:
            copies = []
            if found and found[0].distance <= SAME and self.index.same_image(found[0].row, query_row):
                copies, found = [found[0].row, *found[0].copies], found[1:]
            cards.append({**self._card(query_row), "distance": 0.0, "is_query": True,
                          "copies": [self._card(c) for c in copies]})
        cards += [{**self._card(n.row), "distance": round(n.distance, 6), "copies": [self._card(c) for c in n.copies]}
                  for n in found]
        return cards[:k]


class WebApp:
    """The WSGI application: routes, the host check, errors as JSON ``{"error": ...}``, a request log."""

    def __init__(self, app: SearchApp, loopback_only: bool, quiet: bool = False):
        self.app, self.loopback_only, self.quiet = app, loopback_only, quiet

    def __call__(self, environ: dict, start_response):
        started = time.perf_counter()
        try:
            self._check_host(environ)
            route = {"GET": self._get, "POST": self._post}.get(environ["REQUEST_METHOD"])
            if route is None:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"no {environ['REQUEST_METHOD']} here")
            status, body, content_type = route(environ)
        except RequestError as e:
            status, body, content_type = e.status, _json({"error": str(e)}), "application/json"
        except Exception as e:  # a bug or a broken shard: say what failed, keep serving the other requests
            status, body, content_type = (HTTPStatus.INTERNAL_SERVER_ERROR,
                                          _json({"error": f"internal error ({type(e).__name__}): {e}"}),
                                          "application/json")
        start_response(f"{status.value} {status.phrase}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))), *_HEADERS])
        if not self.quiet:  # one write per line: answers run in several threads
            sys.stderr.write(f"{environ.get('REMOTE_ADDR', '-')} {environ['REQUEST_METHOD']} "
                             f"{environ.get('PATH_INFO', '')} {status.value} "
                             f"{1000 * (time.perf_counter() - started):.0f} ms\n")
            sys.stderr.flush()
        return [body]

    def _check_host(self, environ: dict) -> None:
        host = (environ.get("HTTP_HOST") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.loopback_only and name not in _LOOPBACK_NAMES:
            raise RequestError(HTTPStatus.FORBIDDEN, "this server answers requests for localhost only")

    def _get(self, environ: dict) -> tuple[HTTPStatus, bytes, str]:
        path, query = environ.get("PATH_INFO", ""), parse_qs(environ.get("QUERY_STRING", ""))
        if path in _STATIC:
            name, content_type = _STATIC[path]
            return HTTPStatus.OK, resources.files("medssl.retrieval").joinpath(name).read_bytes(), content_type
        if path == "/api/info":
            return HTTPStatus.OK, _json(self.app.info()), "application/json"
        if path == "/api/samples":
            start, count = _int(query, "start", 0), _int(query, "count", 24)
            modality = query.get("modality", [""])[0] or None
            return HTTPStatus.OK, _json(self.app.samples(max(0, start), max(1, count), modality)), "application/json"
        if path == "/api/search":
            k = min(max(1, _int(query, "k", 10)), MAX_K)
            if "key" in query:
                return HTTPStatus.OK, _json(self.app.search_key(query["key"][0], k)), "application/json"
            return HTTPStatus.OK, _json(self.app.search_row(_int(query, "row", None), k)), "application/json"
        if path.startswith("/thumb/") and path.endswith(".png"):
            try:
                row = int(path[len("/thumb/"):-len(".png")])
            except ValueError:
                raise RequestError(HTTPStatus.NOT_FOUND, "thumbnails are /thumb/ROW.png") from None
            return HTTPStatus.OK, self.app.thumbnail(row), "image/png"
        raise RequestError(HTTPStatus.NOT_FOUND, f"no page {path}")

    def _post(self, environ: dict) -> tuple[HTTPStatus, bytes, str]:
        path = environ.get("PATH_INFO", "")
        if path != "/api/search":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no page {path} to post to")
        # waitress has checked that the length is digits and refused bodies far over the limit unread; the
        # rest of the limit is ours, with a message the page shows.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > self.app.max_upload_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the file is {length / (1 << 20):.2f} MB; the limit is {self.app.max_upload_mb:g} MB "
                               "(medssl serve --max-upload-mb)")
        if length == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the upload is empty: choose an image file")
        data = environ["wsgi.input"].read(length)
        k = min(max(1, _int(parse_qs(environ.get("QUERY_STRING", "")), "k", 10)), MAX_K)
        return HTTPStatus.OK, _json(self.app.search_upload(data, k)), "application/json"


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


class _OneLine(logging.Formatter):
    """A record as one line: the message and the exception's type, never a traceback (a client that went
    away mid-answer is an event to note, not an error of ours)."""

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        return f"medssl serve: {record.getMessage()}" + (f" ({type(error).__name__}: {error})" if error else "")


def _log_in_one_line(logger: logging.Logger, level: int) -> None:
    """Send ``logger``'s records of ``level`` and above to stderr through ``_OneLine`` (once per process)."""
    if not any(isinstance(h.formatter, _OneLine) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


class Server:
    """waitress serving the app, with the calls of ``http.server``'s servers (``server_address``,
    ``serve_forever``, ``shutdown``, ``server_close``), so a caller can run it in a thread and stop it."""

    def __init__(self, app: WebApp, host: str, port: int, max_body_bytes: int):
        import waitress.server

        self._server = waitress.server.create_server(
            app, host=host, port=port, threads=THREADS, backlog=1024, connection_limit=1000,
            max_request_body_size=max_body_bytes, channel_timeout=60, ident="medssl-serve",
            expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        self.server_address = (host, self._server.effective_port)

    def serve_forever(self) -> None:
        self._server.run()

    def shutdown(self) -> None:
        self._server.close()
        self._server.task_dispatcher.shutdown()

    def server_close(self) -> None:
        self._server.close()


def make_server(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 32.0,
                quiet: bool = False) -> Server:
    """A server ready to ``serve_forever()`` (port 0: any free port, see ``server.server_address``)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    app = SearchApp(index, max_upload_mb)
    # waitress's errors (a client gone mid-answer among them) as one line each; not its queue-depth notes.
    _log_in_one_line(logging.getLogger("waitress"), logging.ERROR)
    # Bodies up to the limit are read (ours says why a larger one is refused); beyond it plus 1 MiB, waitress
    # refuses them without reading.
    return Server(WebApp(app, loopback, quiet), host, port, app.max_upload_bytes + (1 << 20))
