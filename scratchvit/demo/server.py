"""The HTTP side of the demo: Python's standard library (http.server), no framework.

Routes:
    GET  /                    the page (static/index.html)
    GET  /static/NAME         the page's assets, only the files named in STATIC_FILES
    GET  /api/info            {"num_layers", "num_heads", "grid", "classes"}: the model's sizes
    POST /api/predict         a drawing in, the model's view of it out (api.py describes both)

Every error is a JSON object {"error": "one line"} with a 4xx status (500 only for a fault of the
server itself, 503 when the model thread is busy past its wait), the connection is closed after each
answer (HTTP/1.0), and nothing is written to disk. What the server refuses, and why:

- A Host header other than this server's own address (the bound address, localhost, 127.0.0.1 or
  [::1] with the port, or the name given as `host`): 421. A page on another site that gets its
  name to resolve to 127.0.0.1 (DNS rebinding) still sends its own name as the Host, so it cannot
  use the model or read the answers.
- POST /api/predict without `Content-Type: application/json`: 415. A cross-site form or a "simple"
  fetch can only send text/plain, form or multipart bodies; JSON needs a preflight this server
  never grants.
- A body over MAX_BODY_BYTES (the largest drawing the API accepts, api.MAX_SIDE a side): 413,
  before it is parsed.
- A request that has not fully arrived REQUEST_DEADLINE_S after it was accepted, however its bytes
  trickle in: 408.

A fixed pool of worker threads answers the connections; the listening loop accepts a connection
only when a worker is free, so excess clients wait in the kernel's listen queue (REQUEST_QUEUE_SIZE
deep) instead of each getting a thread. A client that goes away early is one log line, and every
log line has its control characters escaped, so a request cannot write to the terminal.
"""
import io
import json
import queue
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .api import MAX_SIDE, RequestError

STATIC_DIR = Path(__file__).resolve().parent / "static"
# A fixed list, not a lookup of whatever path is asked for: no request can reach another file.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The largest body is the largest drawing the API accepts (MAX_SIDE x MAX_SIDE) with the widest
# value, "255", written with a space after every comma (Python's json.dumps; the page's
# JSON.stringify writes none, so its bodies are smaller), and the object around it.
MAX_BODY_BYTES = (MAX_SIDE * (MAX_SIDE * len("255, ") + len(", "))
                  + len('{"pixels": [], "layer": 999999999}\r\n'))
MAX_DISCARD_BYTES = 4 * MAX_BODY_BYTES   # how much of a refused body is read to answer it cleanly (discard_body)
REQUEST_DEADLINE_S = 10.0                # from accepting a connection to the last byte of its request
WORKERS = 16                             # threads answering connections; the model itself runs on one (api.ModelThread)
REQUEST_QUEUE_SIZE = 128                 # the listen backlog: connections waiting for a free worker
CLOSE_WAIT_S = 2.0                       # server_close waits this long for the workers to finish their answers
POLL_S = 0.5                             # how often a loop that waits checks whether the server is stopping
# The page loads nothing from elsewhere; the browser enforces it too (the favicon is an empty data: URL).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# C0 controls (ESC, CR, LF, ...), DEL and the C1 controls written as \xNN, and the backslash doubled
# so that an escape in the log is never ambiguous with the same characters sent literally.
_LOG_ESCAPES = str.maketrans({**{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))},
                              ord("\\"): "\\\\"})


def printable(text):
    """`text` with every control character escaped (\\x1b for ESC, ...): safe to write to a terminal."""
    return text.translate(_LOG_ESCAPES)


class RequestDeadline(Exception):
    """The request did not arrive before its deadline. Not a TimeoutError on purpose: http.server
    swallows those without an answer (BaseHTTPRequestHandler.handle_one_request), and this one is
    answered 408."""


class _DeadlineReader(io.RawIOBase):
    """A socket's receiving side in which every read waits at most until one fixed deadline.

    A timeout set once on the socket bounds each read, not the request: a client sending one byte
    every few seconds would hold its worker for good. Here each read gets what is left until the
    deadline as its timeout, so the whole request (request line, headers and body) must arrive in
    time."""

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline          # time.monotonic() value

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RequestDeadline
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise RequestDeadline from None


class _SocketWriter(io.BufferedIOBase):
    """A socket's sending side; each write must be sent within timeout_s (sendall's timeout bounds
    the whole call: Python's socket docs, "Changed in version 3.5"), so a client that stops reading
    cannot hold its worker either."""

    def __init__(self, sock, timeout_s):
        self._sock = sock
        self._timeout_s = timeout_s

    def writable(self):
        return True

    def write(self, data):
        self._sock.settimeout(self._timeout_s)
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self):
        return self._sock.fileno()


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "scratchvit-demo"

    def setup(self):
        # StreamRequestHandler.setup with the deadline: the request must be in by `deadline`
        self.connection = self.request
        self.deadline = time.monotonic() + self.server.deadline_s
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))
        self.wfile = _SocketWriter(self.connection, self.server.deadline_s)

    def handle(self):
        """One request per connection (HTTP/1.0), 408 if it is not in by the deadline."""
        self.close_connection = True
        # what send_response needs, should the deadline pass before the request line is read
        self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
        try:
            self.handle_one_request()
        except RequestDeadline:
            self.send_json(HTTPStatus.REQUEST_TIMEOUT,
                           {"error": f"the request did not arrive within {self.server.deadline_s:g} s"})

    def parse_request(self):
        """http.server's parsing, then the Host check: a request addressed to another name is
        answered 421 (module docstring), whatever its path or method."""
        if not super().parse_request():
            return False
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or hosts[0].strip().lower() not in self.server.allowed_hosts:
            self.close_connection = True
            self.discard_unwanted_body()
            said = repr(hosts[0]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
            self.send_json(HTTPStatus.MISDIRECTED_REQUEST,
                           {"error": f"the Host header must name this server ({self.server.url_host} or "
                                     f"localhost:{self.server.port}), got {said}"})
            return False
        return True

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
        # get_content_type: lower case, parameters (charset) dropped, text/plain when absent
        if self.headers.get_content_type() != "application/json":
            self.discard_unwanted_body()
            return self.send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                  {"error": f"{path} takes Content-Type: application/json, "
                                            f"got {self.headers.get('Content-Type', 'none')!r}"})
        try:
            body = self.read_json_body()
            answer = json_bytes(self.server.demo.answer(body))
        except RequestError as error:
            return self.send_json(error.status, {"error": str(error)})
        except ConnectionError:             # the client went away while sending: one line in the log (handle_error)
            raise
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
        except RequestDeadline:
            raise RequestError(f"the request body did not arrive within {self.server.deadline_s:g} s",
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
        except (OSError, RequestDeadline):            # a reset or the deadline: the answer may still get through
            return


def json_bytes(payload):
    # allow_nan=False: a NaN or an infinity raises here instead of becoming a body that is not
    # JSON (Python would write NaN, which JSON.parse rejects)
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _url_host(host):
    return f"[{host}]" if ":" in host else host           # an IPv6 literal is bracketed in URLs and Host headers


def allowed_hosts(bound_host, port, host_name=None):
    """The Host header values this server answers: its bound address, localhost, 127.0.0.1, [::1]
    and the name it was asked to listen on, each with the port (and also bare on port 80, where
    browsers leave the port out). Lower case: host names are compared without case."""
    names = {"localhost", "127.0.0.1", "[::1]", _url_host(bound_host)}
    if host_name:
        names.add(_url_host(host_name))
    names = {name.lower() for name in names}
    return frozenset({f"{name}:{port}" for name in names} | (names if port == 80 else set()))


class DemoServer(HTTPServer):
    """An HTTPServer with a fixed pool of worker threads, holding the Demo its handlers answer with.

    The listening loop (serve_forever) takes a free worker before it accepts a connection
    (get_request), so at most `workers` connections are open at once and the rest wait in the
    listen queue; the worker closes the connection and frees itself (shutdown_request)."""

    request_queue_size = REQUEST_QUEUE_SIZE       # the listen() backlog (socketserver.TCPServer.server_activate)

    def __init__(self, demo, host="127.0.0.1", port=8000, *, log=None, workers=WORKERS,
                 deadline_s=REQUEST_DEADLINE_S):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                or not 0 < deadline_s < float("inf")):
            raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
        self.demo = demo
        self._log = log or _log_to_stderr
        self.deadline_s = deadline_s
        self._free_workers = threading.BoundedSemaphore(workers)
        self._connections = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._workers = []                    # none yet: server_close runs if binding fails
        if ":" in host:                       # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DemoHandler)
        bound_host, self.port = self.server_address[:2]
        self.url_host = f"{_url_host(host or bound_host)}:{self.port}"
        self.allowed_hosts = allowed_hosts(bound_host, self.port, host)
        for k in range(workers):
            self._workers.append(threading.Thread(target=self._work, name=f"scratchvit-demo-http-{k}", daemon=True))
            self._workers[-1].start()

    @property
    def url(self):
        return f"http://{_url_host(self.server_address[0])}:{self.port}/"

    def log(self, line):
        self._log(printable(line))

    # ---------------------------------------------------------------------------------------------
    # the pool

    def get_request(self):
        # a free worker first: until there is one, the connection stays in the listen queue
        while not self._free_workers.acquire(timeout=POLL_S):
            if self._stopping.is_set():
                raise OSError("the server is stopping")          # _handle_request_noblock drops it
        try:
            return super().get_request()
        except BaseException:
            self._free_workers.release()
            raise

    def process_request(self, request, client_address):
        self._connections.put((request, client_address))

    def _work(self):
        while True:
            job = self._connections.get()
            if job is None:
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def shutdown_request(self, request):
        try:
            super().shutdown_request(request)
        finally:
            self._free_workers.release()

    def handle_error(self, request, client_address):
        """One log line, never socketserver's traceback: a client that went away (a reset, a broken
        pipe, an answer it did not read in time) is an ordinary event for a server."""
        error = sys.exc_info()[1]
        client = client_address[0] if client_address else "?"
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"{client} went away before the answer was complete ({type(error).__name__})")
        else:
            self.log(f"{client} error in the server: {type(error).__name__}: {error}")

    # ---------------------------------------------------------------------------------------------
    # stopping

    def shutdown(self):
        """Stop serve_forever (from another thread) and wait for it to return."""
        self._stopping.set()
        super().shutdown()

    def server_close(self):
        """Close the listening socket, then let the workers finish the connections they hold,
        waiting at most CLOSE_WAIT_S: they are daemon threads, so one stuck on a slow client
        cannot keep the process alive."""
        self._stopping.set()
        super().server_close()
        for _ in self._workers:
            self._connections.put(None)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))


def _log_to_stderr(line):
    print(line, file=sys.stderr, flush=True)


def make_server(demo, host="127.0.0.1", port=8000, *, log=None, workers=WORKERS, deadline_s=REQUEST_DEADLINE_S):
    """A DemoServer bound to (host, port) (port 0: a free one; read it from `.url`), not yet serving:
    call `.serve_forever()` (in a thread, for tests) and `.shutdown()`, `.server_close()` to stop.
    `workers` threads answer connections; each request must arrive within `deadline_s` seconds."""
    return DemoServer(demo, host, port, log=log, workers=workers, deadline_s=deadline_s)
