"""The HTTP side of the demo: Python's standard library (http.server), no framework.

Routes:
    GET  /                    the page (static/index.html)
    GET  /static/NAME         the page's assets, only the files named in STATIC_FILES
    GET  /api/info            {"num_layers", "num_heads", "grid", "classes"}: the model's sizes
    POST /api/predict         a drawing in, the model's view of it out (api.py describes both)

Every error is a JSON object {"error": "one line"} with a 4xx status (500 only for a fault of the
server itself), the connection is closed after each answer (HTTP/1.0), and nothing is written to
disk. A request body over MAX_BODY_BYTES is refused before it is parsed; a client that stalls is
dropped after REQUEST_TIMEOUT_S, so a stuck connection cannot hold a thread forever.
"""
import json
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .api import RequestError

STATIC_DIR = Path(__file__).resolve().parent / "static"
# A fixed list, not a lookup of whatever path is asked for: no request can reach another file.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
MAX_BODY_BYTES = 2 * 1024 * 1024     # the page's 280 x 280 drawing is about 390 KB of JSON
MAX_DISCARD_BYTES = 8 * MAX_BODY_BYTES   # how much of a refused body is read to answer it cleanly (discard_body)
REQUEST_TIMEOUT_S = 10
# The page loads nothing from elsewhere; the browser enforces it too (the favicon is an empty data: URL).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "scratchvit-demo"
    timeout = REQUEST_TIMEOUT_S          # StreamRequestHandler sets it on the socket

    # ---------------------------------------------------------------------------------------------
    # answers

    def send_json(self, status, payload, headers=()):
        self.send_body(status, json_bytes(payload), "application/json", [("Cache-Control", "no-store"), *headers])

    def send_body(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, ...) as JSON too.
        http.server answers a method it has no do_ method for with 501; a method this server does
        not allow on any path is the client's mistake, so it becomes 405."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:
            self.discard_unwanted_body()
            return self.not_allowed("GET, HEAD, POST")
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    def not_allowed(self, allowed):
        self.send_json(HTTPStatus.METHOD_NOT_ALLOWED,
                       {"error": f"method {self.command} is not allowed here (allowed: {allowed})"},
                       headers=[("Allow", allowed)])

    def send_static(self, name):
        try:
            body = (STATIC_DIR / name).read_bytes()
        except OSError:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"{name} is missing from the installed package"})
        self.send_body(HTTPStatus.OK, body, STATIC_FILES[name],
                       [("Cache-Control", "no-cache"), ("Content-Security-Policy", CONTENT_SECURITY_POLICY)])

    def log_message(self, format, *args):
        self.server.log(f"{self.address_string()} {format % args}")

    # ---------------------------------------------------------------------------------------------
    # routes

    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self.send_static("index.html")
        if path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
            return self.send_static(path[len("/static/"):])
        if path == "/api/info":
            return self.send_json(HTTPStatus.OK, self.server.demo.info())
        if path == "/api/predict":
            return self.not_allowed("POST")
        return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def do_POST(self):
        path = urlsplit(self.path).path
        if path != "/api/predict":
            self.discard_unwanted_body()
            known = path in ("/", "/index.html", "/api/info") or path.startswith("/static/")
            if known:
                return self.not_allowed("GET, HEAD")
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})
        try:
            answer = json_bytes(self.server.demo.answer(self.read_json_body()))
        except RequestError as error:
            return self.send_json(error.status, {"error": str(error)})
        except Exception as error:          # a fault of ours (a NaN in the answer too): one line, and keep serving
            self.server.log(f"error answering {path}: {type(error).__name__}: {error}")
            return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  {"error": f"the server failed on this drawing ({type(error).__name__})"})
        self.send_body(HTTPStatus.OK, answer, "application/json", [("Cache-Control", "no-store")])

    def do_PUT(self):
        self.discard_unwanted_body()
        self.not_allowed("GET, HEAD, POST")

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    # ---------------------------------------------------------------------------------------------
    # the request body

    def read_json_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a request body with a Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length)
        except ValueError:
            raise RequestError(f"Content-Length must be a number of bytes, got {length!r}") from None
        if length < 0:
            raise RequestError(f"Content-Length must be a number of bytes, got {length}")
        if length > MAX_BODY_BYTES:
            self.discard_body(length)
            raise RequestError(f"the request body is {length} bytes, over the limit of {MAX_BODY_BYTES}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {REQUEST_TIMEOUT_S} s",
                               HTTPStatus.REQUEST_TIMEOUT) from None
        if len(raw) < length:
            raise RequestError(f"the request body ended after {len(raw)} of {length} bytes")
        try:
            # parse_constant rejects NaN, Infinity and -Infinity, which Python's json accepts and JSON does not
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except RecursionError:
            raise RequestError("the request body is not valid JSON: nested too deeply") from None
        except ValueError as error:        # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            raise RequestError(f"the request body is not valid JSON: {str(error).splitlines()[0]}") from None

    def discard_unwanted_body(self):
        """Drop the body of a request that is refused for its path or method (see discard_body)."""
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = 0
        if length > 0:
            self.discard_body(length)

    def discard_body(self, length):
        """Read and drop a refused body of up to MAX_DISCARD_BYTES before answering. Closing a socket
        with unread data makes the kernel reset the connection (RFC 1122, 4.2.2.13), and a client
        still sending its body then sees the reset instead of the 413; a larger body is not worth
        reading, and its sender gets the reset."""
        self.close_connection = True
        if length > MAX_DISCARD_BYTES:
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:            # a timeout or a reset: the answer may still get through
            return


def json_bytes(payload):
    # allow_nan=False: a NaN or an infinity raises here instead of becoming a body that is not
    # JSON (Python would write NaN, which JSON.parse rejects)
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class DemoServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the Demo its handlers answer with."""

    daemon_threads = True           # a request in progress does not keep the process alive after Ctrl-C

    def __init__(self, demo, host="127.0.0.1", port=8000, *, log=None):
        self.demo = demo
        self.log = log or _log_to_stderr
        if ":" in host:                       # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DemoHandler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        if ":" in host:                       # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{port}/"


def _log_to_stderr(line):
    print(line, file=sys.stderr, flush=True)


def make_server(demo, host="127.0.0.1", port=8000, *, log=None):
    """A DemoServer bound to (host, port) (port 0: a free one; read it from `.url`), not yet serving:
    call `.serve_forever()` (in a thread, for tests) and `.shutdown()`, `.server_close()` to stop."""
    return DemoServer(demo, host, port, log=log)
