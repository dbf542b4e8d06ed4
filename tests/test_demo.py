"""The demo's HTTP API (scratchvit/demo), served in-process on a free port, and its command line.

The HTTP cases that need a client to misbehave (a forged Host, a request that trickles in, a client
that resets its connection) use raw sockets on loopback, each bounded in time: servers made for
them have a short deadline (SHORT_DEADLINE_S) and few workers.

The model is a tiny ViT (28x28 images, patch 7: a 4x4 patch grid, dim 16, two layers of two heads),
built, saved with scratchvit.checkpoint.save_checkpoint and loaded back through
scratchvit.predict.load_trained_model, as the command line does. It is untrained: these tests check
what the server answers and how, not what the model believes; the browser test and the README's
screenshot use a trained one.
"""
import configparser
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy
import pytest

from conftest import GPU_SKIP_REASON, on_gpu
from scratchvit.optim import AdamW
from scratchvit.checkpoint import save_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.vit import ViT

if importlib.util.find_spec("PIL") is None:
    pytest.skip("the demo's MNIST-style preprocessing needs Pillow: pip install Pillow", allow_module_level=True)

import scratchvit.preprocess as preprocess
from scratchvit.attention_maps import inspect
import scratchvit.demo.api as demo_api
from scratchvit.demo import MAX_BODY_BYTES, Demo, RequestError, make_server
from scratchvit.demo.api import MAX_SIDE, MIN_SIDE, parse_pixels
from scratchvit.demo.server import MAX_DISCARD_BYTES, REQUEST_QUEUE_SIZE, STATIC_FILES, allowed_hosts, printable
from scratchvit.predict import load_trained_model, probabilities

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)
GRID = 28 // TINY_MODEL["patch_size"]
PAD = 280                  # the page's canvas size
SHORT_DEADLINE_S = 0.5     # the request deadline of the servers that test it
JSON = {"Content-Type": "application/json"}


def write_tiny_checkpoint(path):
    model = ViT(image_size=28, num_classes=10, seed=1, **TINY_MODEL)
    optimizer = AdamW(list(model.parameters()), lr=1e-3)
    save_checkpoint(path, model=model, optimizer=optimizer, config=TrainConfig(**TINY_MODEL), epoch=1,
                    step_in_epoch=0, random_state=None, history=[])
    return path


def drawing(points, *, size=PAD, width=22, ink_on_light=True):
    """(size, size) uint8: a thick polyline through `points` (x, y in 0..1), like a stroke on the page."""
    y, x = numpy.mgrid[0:size, 0:size].astype(numpy.float64) + 0.5
    distance = numpy.full((size, size), numpy.inf)
    corners = numpy.asarray(points, dtype=numpy.float64) * size
    for (x0, y0), (x1, y1) in zip(corners[:-1], corners[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = numpy.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
        distance = numpy.minimum(distance, numpy.hypot(x - x0 - t * dx, y - y0 - t * dy))
    ink = distance <= width / 2
    if ink_on_light:
        return numpy.where(ink, 17, 255).astype(numpy.uint8)
    return numpy.where(ink, 255, 0).astype(numpy.uint8)


SEVEN = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]


# ------------------------------------------------------------------------------------------------
# a server on a free port, for the whole module

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint.npz")


@pytest.fixture(scope="module")
def model(checkpoint):
    model, _ = load_trained_model(checkpoint)
    return model


@pytest.fixture(scope="module")
def demo(model):
    demo = Demo(model)
    yield demo
    demo.close()


@contextmanager
def serving(demo, host="127.0.0.1", **options):
    """A server for `demo` on a free port, serving from a thread; its log lines in `.log_lines`."""
    log = []
    server = make_server(demo, host, 0, log=log.append, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.log_lines = log
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo) as server:
        yield server


@pytest.fixture
def small_server(demo):
    """Two workers and a short deadline, for the cases that hold connections open."""
    with serving(demo, workers=2, deadline_s=SHORT_DEADLINE_S) as server:
        yield server


def request(server, method, path, body=None, headers=None):
    """(status, headers, decoded JSON or raw bytes) for one request on a fresh connection; a dict
    or list body is sent as JSON with its Content-Type."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {**JSON, **(headers or {})}
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return response.status, response, data


def predict(server, pixels, **fields):
    return request(server, "POST", "/api/predict", dict(pixels=numpy.asarray(pixels).tolist(), **fields))


def assert_still_serving(server):
    status, _, info = request(server, "GET", "/api/info")
    assert status == 200 and info["num_layers"] == TINY_MODEL["depth"]


# ------------------------------------------------------------------------------------------------
# a drawing in, the model's view out

def test_a_drawing_gets_probabilities_a_class_the_input_and_the_maps(server):
    status, response, answer = predict(server, drawing(SEVEN), layer=0)
    assert status == 200, answer
    assert response.getheader("Content-Type") == "application/json"
    assert answer["blank"] is False
    probabilities = numpy.array(answer["probabilities"])
    assert probabilities.shape == (10,)
    assert numpy.all((probabilities >= 0) & (probabilities <= 1))
    assert probabilities.sum() == pytest.approx(1, abs=1e-5)
    assert answer["prediction"] == int(numpy.argmax(probabilities)) and 0 <= answer["prediction"] <= 9
    assert answer["classes"] == [str(k) for k in range(10)]
    seen = numpy.array(answer["input"])
    assert seen.shape == (28, 28) and seen.min() >= 0 and seen.max() <= 255 and seen.dtype.kind == "i"
    assert seen.max() > 200 and seen[0].max() == 0            # ink bright on a dark background, inside a margin
    assert numpy.array(answer["rollout"]).shape == (GRID, GRID)
    assert numpy.array(answer["heads"]).shape == (TINY_MODEL["heads"], GRID, GRID)
    assert (answer["layer"], answer["num_layers"], answer["num_heads"], answer["grid"]) == (
        0, TINY_MODEL["depth"], TINY_MODEL["heads"], GRID)


def test_the_answer_is_the_model_on_the_preprocessed_drawing(server, model):
    """The server adds nothing of its own: its maps are attention_maps.inspect on the preprocessing's
    output, its probabilities predict's (averaged over the drawing's shifts) on the same."""
    pixels = drawing(SEVEN)
    model_input = preprocess.to_model_input(preprocess.mnist_style(pixels)[None])
    expected = inspect(model, model_input)
    averaged = probabilities(model, model_input)
    for layer in range(TINY_MODEL["depth"]):
        _, _, answer = predict(server, pixels, layer=layer)
        numpy.testing.assert_allclose(answer["probabilities"], averaged[0], rtol=0, atol=1e-6)
        numpy.testing.assert_allclose(answer["rollout"], expected["rollout"][0], rtol=0, atol=1e-6)
        numpy.testing.assert_allclose(answer["heads"], expected["heads"][0, layer], rtol=0, atol=1e-6)
        numpy.testing.assert_array_equal(answer["input"], numpy.rint(preprocess.mnist_style(pixels)))


def test_without_the_shift_average_the_probabilities_are_the_drawings_alone(model):
    pixels = drawing(SEVEN)
    model_input = preprocess.to_model_input(preprocess.mnist_style(pixels)[None])
    expected = inspect(model, model_input)
    assert numpy.abs(probabilities(model, model_input) - expected["probabilities"]).max() > 1e-4
    one_pass = Demo(model, shift_average=False)
    try:
        answer = one_pass.predict(pixels)
    finally:
        one_pass.close()
    numpy.testing.assert_allclose(answer["probabilities"], expected["probabilities"][0], rtol=0, atol=1e-6)
    numpy.testing.assert_allclose(answer["rollout"], expected["rollout"][0], rtol=0, atol=1e-6)


def test_the_layer_defaults_to_the_last(server):
    _, _, answer = predict(server, drawing(SEVEN))
    assert answer["layer"] == TINY_MODEL["depth"] - 1


def test_dark_on_light_and_light_on_dark_drawings_are_the_same_digit(server):
    _, _, dark_ink = predict(server, drawing(SEVEN, ink_on_light=True))
    _, _, light_ink = predict(server, drawing(SEVEN, ink_on_light=False))
    assert dark_ink["prediction"] == light_ink["prediction"]
    assert dark_ink["probabilities"] == pytest.approx(light_ink["probabilities"], abs=1e-3)


def test_any_size_between_the_limits_is_accepted(server):
    small = drawing(SEVEN, size=28, width=3)
    wide = numpy.full((60, 200), 255, numpy.uint8)
    wide[20:40, 90:110] = 0
    for pixels in (small, wide, small.astype(float) / 2):        # floats are rounded
        status, _, answer = predict(server, pixels)
        assert status == 200 and answer["blank"] is False, answer


@pytest.mark.parametrize("value", [0, 255])
def test_a_blank_drawing_answers_blank_without_numbers(server, value):
    status, _, answer = predict(server, numpy.full((PAD, PAD), value))
    assert status == 200
    assert answer["blank"] is True and answer["message"]
    assert "probabilities" not in answer and "rollout" not in answer
    assert answer["num_layers"] == TINY_MODEL["depth"]


def test_simultaneous_requests_get_their_own_answers(server):
    """Eight threads at once, two different drawings: each answer matches its drawing's answer
    alone (the model keeps per-forward caches, so the server must run one forward at a time)."""
    drawings = [drawing(SEVEN), drawing([(0.5, 0.15), (0.5, 0.85)])]
    alone = [predict(server, pixels)[2]["probabilities"] for pixels in drawings]
    answers = [None] * 8

    def ask(index):
        answers[index] = predict(server, drawings[index % 2])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, (status, _, answer) in enumerate(answers):
        assert status == 200
        assert answer["probabilities"] == pytest.approx(alone[index % 2], abs=1e-6)


@on_gpu
def test_on_the_gpu_the_answer_is_the_cpu_answer(checkpoint, model):
    gpu_model, _ = load_trained_model(checkpoint, device="gpu")
    pixels = drawing(SEVEN)
    for layer in range(TINY_MODEL["depth"]):
        on_gpu, on_cpu = Demo(gpu_model).predict(pixels, layer), Demo(model).predict(pixels, layer)
        assert on_gpu["prediction"] == on_cpu["prediction"] and on_gpu["input"] == on_cpu["input"]
        for key in ("probabilities", "rollout", "heads"):
            numpy.testing.assert_allclose(on_gpu[key], on_cpu[key], rtol=0, atol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------------------------
# bad requests: a 4xx JSON error, and the server keeps serving

def rows(height, width, value=255):
    return [[value] * width for _ in range(height)]


def body_with(pixels=None, **fields):
    return json.dumps(dict(pixels=rows(32, 32) if pixels is None else pixels, **fields))


BAD_BODIES = {
    "malformed JSON": ('{"pixels": [[0, 1', "not valid JSON"),
    "not UTF-8": (b'{"pixels": "\xff\xfe"}', "not valid JSON"),
    "nested too deeply": ("[" * 100000 + "]" * 100000, "JSON"),
    "an array, not an object": ("[[0, 1], [2, 3]]", "JSON object"),
    "no pixels": ('{"layer": 0}', '"pixels"'),
    "an unknown field": (body_with(colour="red"), "unknown field"),
    "pixels a string": (json.dumps({"pixels": "iVBORw0KGgo="}), "list of rows"),
    "pixels one row of numbers": (json.dumps({"pixels": [0] * 64}), "list of rows"),
    "pixels three-dimensional": (body_with(pixels=[[[0]] * 32] * 32), "numbers 0..255"),
    "ragged rows": (body_with(pixels=rows(31, 32) + [[0] * 31]), "same length"),
    "empty": (body_with(pixels=[]), "list of rows"),
    "too small": (body_with(pixels=rows(4, 4)), "between 8 and"),
    "too large": (body_with(pixels=rows(MAX_SIDE + 1, 8)), "between 8 and"),
    "a value over 255": (body_with(pixels=rows(31, 32) + [[256] * 32]), "between 0 and 255"),
    "a negative value": (body_with(pixels=rows(31, 32) + [[-1] * 32]), "between 0 and 255"),
    "a huge number (infinity)": (body_with(pixels=rows(31, 32) + [[1e999] * 32]).replace("Infinity", "1e999"),
                                 "between 0 and 255"),
    "NaN": (body_with(pixels=rows(31, 32)).replace("]]", "], [NaN" + ", 0" * 31 + "]]"), "not valid JSON"),
    "a string value": (body_with(pixels=rows(31, 32) + [["12"] * 32]), "numbers 0..255"),
    "a boolean value": (body_with(pixels=rows(31, 32) + [[True] * 32]), "numbers 0..255"),
    "a null value": (body_with(pixels=rows(31, 32) + [[None] * 32]), "numbers 0..255"),
    "an integer too large for any array": (body_with(pixels=rows(31, 32) + [[10 ** 30] * 32]), "between 0 and 255"),
    "layer out of range": (body_with(layer=TINY_MODEL["depth"]), '"layer"'),
    "layer negative": (body_with(layer=-1), '"layer"'),
    "layer a string": (body_with(layer="1"), '"layer"'),
    "layer a fraction": (body_with(layer=0.5), '"layer"'),
    "layer a boolean": (body_with(layer=True), '"layer"'),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_a_bad_body_gets_400_and_the_server_keeps_serving(server, name):
    body, says = BAD_BODIES[name]
    status, response, answer = request(server, "POST", "/api/predict", body,
                                       {"Content-Type": "application/json"})
    assert status == 400, (name, answer)
    assert response.getheader("Content-Type") == "application/json"
    assert set(answer) == {"error"} and says in answer["error"] and "\n" not in answer["error"]
    assert_still_serving(server)


def test_a_body_over_the_limit_gets_413(server):
    status, _, answer = request(server, "POST", "/api/predict", b" " * (MAX_BODY_BYTES + 1), JSON)
    assert status == 413 and "over the limit" in answer["error"]
    assert_still_serving(server)


def test_a_huge_announced_body_is_refused_unread(server):
    """A Content-Length of 1 TB, with no body sent: answered at once, not waited for."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host_of(server)}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n".encode())
        answer = connection.makefile("rb").read()       # the client keeps its side open: no EOF to wait for
    assert answer.startswith(b"HTTP/1.0 413") and b'"error"' in answer
    assert_still_serving(server)


def host_of(server):
    """The Host header a browser sends to `server` (the address in its URL)."""
    return server.url.split("/")[2]


def raw_exchange(server, data):
    """The server's whole answer to `data`, sent as is; the client then closes its sending side, so
    a body shorter than announced ends there instead of after the server's timeout."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        return connection.makefile("rb").read()


@pytest.mark.parametrize("headers, status, says", [
    ("", 411, "Content-Length"),
    ("Content-Length: many\r\n", 400, "Content-Length"),
    ("Content-Length: -5\r\n", 400, "Content-Length"),
])
def test_a_bad_content_length_gets_4xx(server, headers, status, says):
    answer = raw_exchange(server, f"POST /api/predict HTTP/1.1\r\nHost: {host_of(server)}\r\n"
                                  f"Content-Type: application/json\r\n{headers}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.0 {status}".encode()), head
    assert says in json.loads(body)["error"]
    assert_still_serving(server)


def test_a_body_shorter_than_announced_gets_400(server):
    answer = raw_exchange(server, f"POST /api/predict HTTP/1.1\r\nHost: {host_of(server)}\r\nContent-Type: "
                                  'application/json\r\nContent-Length: 100\r\n\r\n{"pixels": '.encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and "ended after" in json.loads(body)["error"]
    assert_still_serving(server)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nowhere", 404),
    ("POST", "/nowhere", 404),
    ("GET", "/static/api.py", 404),
    ("GET", "/static/../api.py", 404),
    ("GET", "/static/%2e%2e/api.py", 404),
    ("GET", "/static/", 404),
    ("GET", "/api/predict", 405),
    ("POST", "/", 405),
    ("POST", "/static/app.js", 405),
    ("PUT", "/api/predict", 405),
    ("DELETE", "/", 405),
    ("OPTIONS", "/api/predict", 405),
    ("BREW", "/", 405),
])
def test_unknown_paths_and_methods_get_4xx_json(server, method, path, status):
    got, response, answer = request(server, method, path, body=b"{}" if method != "GET" else None)
    assert got == status, answer
    assert set(answer) == {"error"}
    if status == 405:
        assert response.getheader("Allow")
    assert_still_serving(server)


def test_a_malformed_request_line_gets_400_json(server):
    # an HTTP/1.1 request line with a space in its path: http.server's "Bad request syntax", whose
    # answer send_error turns into JSON (a line with no HTTP/ version at all is taken for HTTP/0.9,
    # which has no status line or headers to answer with, so it is not used here)
    answer = raw_exchange(server, b"GET /a b HTTP/1.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0]
    assert "error" in json.loads(body)
    assert_still_serving(server)


def broken_model(pixels, layer=None):
    raise FloatingPointError("the model broke")


def nan_model(pixels, layer=None):
    return dict(blank=False, probabilities=[float("nan")] * 10)


@pytest.mark.parametrize("fault, says", [(broken_model, "FloatingPointError"), (nan_model, "ValueError")])
def test_a_fault_in_the_model_gets_500_never_nan_and_the_server_keeps_serving(model, fault, says):
    demo = Demo(model)
    demo.predict = fault
    server = make_server(demo, "127.0.0.1", 0, log=lambda line: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, _, answer = predict(server, drawing(SEVEN))
        assert status == 500 and says in answer["error"]
        assert_still_serving(server)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------
# the page

STATIC = {"/": "text/html", "/static/app.js": "text/javascript", "/static/style.css": "text/css"}


@pytest.mark.parametrize("path", STATIC)
def test_the_page_and_its_assets_are_served(server, path):
    status, response, body = request(server, "GET", path + "?cache=1")
    assert status == 200
    assert response.getheader("Content-Type").startswith(STATIC[path])
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    text = body.decode()
    # no network: nothing is loaded from another origin
    for outside in ("http://", "https://", "src=\"//", "href=\"//", "@import"):
        assert outside not in text, (path, outside)
    if path == "/":
        for reference in ('id="pad"', 'id="clear"', 'id="layer"', 'id="bars"', 'id="input"', 'id="rollout"',
                          "/static/app.js", "/static/style.css"):
            assert reference in text


def test_head_answers_without_a_body(server):
    status, response, body = request(server, "HEAD", "/")
    assert status == 200 and body == b"" and int(response.getheader("Content-Length")) > 0


def test_info_gives_the_model_sizes(server):
    status, _, info = request(server, "GET", "/api/info")
    assert status == 200
    assert info == dict(num_layers=TINY_MODEL["depth"], num_heads=TINY_MODEL["heads"], grid=GRID,
                        classes=[str(k) for k in range(10)])


def test_the_static_files_are_package_data():
    """setup.cfg installs scratchvit/demo/static/*, or an installed demo would serve 404s for its own page."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    assert "static/*" in config["options.package_data"]["scratchvit.demo"].split()
    for name in STATIC_FILES:
        assert (REPO_ROOT / "scratchvit" / "demo" / "static" / name).is_file()


# ------------------------------------------------------------------------------------------------
# the command line

def start_cli(checkpoint, cwd, *options):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "scratchvit.demo", "--checkpoint", str(checkpoint), *options],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("shift_average", [True, False])
def test_the_command_serves_on_loopback_writes_nothing_and_stops_on_ctrl_c(checkpoint, model, tmp_path, shift_average):
    process = start_cli(checkpoint, tmp_path, "--port", "0", "--quiet", *([] if shift_average else ["--no-shift-average"]))
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split()[line.split().index("demo:") + 1]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/api/predict", json.dumps({"pixels": drawing(SEVEN).tolist()}), JSON)
        answer = json.loads(connection.getresponse().read())
        connection.close()
        model_input = preprocess.to_model_input(preprocess.mnist_style(drawing(SEVEN))[None])
        expected = probabilities(model, model_input, shift_average=shift_average)[0]
        numpy.testing.assert_allclose(answer["probabilities"], expected, rtol=0, atol=1e-6)
        # a client that holds a connection open without sending: Ctrl-C must not wait for it
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(tmp_path.iterdir()) == []          # the server wrote no file


@pytest.mark.parametrize("options, status, says", [
    (["--port", "0"], 1, "missing.npz"),                           # the checkpoint is missing
    (["--port", "70000"], 2, "--port"),
])
def test_the_command_reports_problems_in_one_line(tmp_path, options, status, says):
    process = start_cli(tmp_path / "missing.npz", tmp_path, *options)
    out, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert len(err.strip().splitlines()) == 1 and says in err, err


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="the GPU backend works here: nothing to report")
def test_the_command_reports_a_missing_gpu_backend(checkpoint, tmp_path):
    process = start_cli(checkpoint, tmp_path, "--port", "0", "--device", "gpu")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and len(err.strip().splitlines()) == 1, err


def test_the_command_reports_a_damaged_checkpoint(tmp_path):
    damaged = tmp_path / "checkpoint.npz"
    damaged.write_bytes(b"not a checkpoint")
    process = start_cli(damaged, tmp_path, "--port", "0")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and len(err.strip().splitlines()) == 1, err


def test_the_command_reports_a_port_in_use(checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = start_cli(checkpoint, tmp_path, "--port", str(taken.getsockname()[1]))
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "cannot listen" in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------
# the limits of api.py on both sides (MIN_SIDE, MAX_SIDE), and the body limit that follows from them

@pytest.mark.parametrize("height, width", [
    (MIN_SIDE, MIN_SIDE), (MAX_SIDE, MIN_SIDE), (MIN_SIDE, MAX_SIDE), (MAX_SIDE, MAX_SIDE)])
def test_a_drawing_of_exactly_the_limits_is_accepted(height, width):
    assert parse_pixels(rows(height, width, 7)).shape == (height, width)


@pytest.mark.parametrize("height, width", [
    (MIN_SIDE - 1, MIN_SIDE), (MIN_SIDE, MIN_SIDE - 1), (MAX_SIDE + 1, MIN_SIDE), (MIN_SIDE, MAX_SIDE + 1)])
def test_a_drawing_one_beyond_the_limits_is_refused(height, width):
    with pytest.raises(RequestError, match=f"between {MIN_SIDE} and {MAX_SIDE} pixels on each side") as refused:
        parse_pixels(rows(height, width, 7))
    assert refused.value.status == 400


def largest_drawing():
    """MAX_SIDE x MAX_SIDE with a digit in it, every value three digits long (the widest JSON)."""
    pixels = numpy.full((MAX_SIDE, MAX_SIDE), 255, dtype=numpy.uint8)
    pixels[MAX_SIDE // 5: -MAX_SIDE // 5, MAX_SIDE // 2 - 40: MAX_SIDE // 2 + 40] = 100
    return pixels


def test_the_largest_drawing_is_accepted_as_the_page_and_as_python_send_it(server):
    """The body limit admits MAX_SIDE x MAX_SIDE in the page's encoding (JSON.stringify: no spaces)
    and in json.dumps's (a space after each comma, the widest), at the highest layer."""
    pixels = largest_drawing().tolist()
    request_body = {"pixels": pixels, "layer": TINY_MODEL["depth"] - 1}
    page_body = json.dumps(request_body, separators=(",", ":"))
    widest_body = json.dumps(request_body)
    assert len(page_body) < len(widest_body) <= MAX_BODY_BYTES
    for body in (page_body, widest_body):
        status, _, answer = request(server, "POST", "/api/predict", body, JSON)
        assert status == 200 and answer["blank"] is False, answer


def test_a_body_of_exactly_the_limit_is_read(server):
    """MAX_BODY_BYTES is a body the server reads and answers (JSON may end in spaces), one byte
    more is refused unread (test_a_body_over_the_limit_gets_413)."""
    body = json.dumps({"pixels": drawing(SEVEN, size=32, width=4).tolist()})
    body += " " * (MAX_BODY_BYTES - len(body))
    status, _, answer = request(server, "POST", "/api/predict", body, JSON)
    assert status == 200 and answer["blank"] is False, answer


def test_a_refused_body_up_to_the_discard_limit_is_read_so_its_sender_gets_the_413(server):
    """A client that sends its whole body before reading: up to MAX_DISCARD_BYTES the server reads
    it and the client reads a 413 (unread data would make the close a reset)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host_of(server)}\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {MAX_DISCARD_BYTES}\r\n\r\n".encode())
        connection.sendall(b" " * MAX_DISCARD_BYTES)
        answer = connection.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 413"), answer[:100]


# ------------------------------------------------------------------------------------------------
# only requests addressed to this server (DNS rebinding), only JSON on the API (cross-site forms)

def host_cases(port):
    accepted = [f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"]
    refused = [f"evil.example:{port}", f"localhost.evil.example:{port}", f"127.0.0.1:{port + 1}",
               "127.0.0.1", "localhost", f"127.0.0.1:{port}@evil.example", "", None]
    return accepted, refused


def raw_request(server, method, path, host, headers="", body=b""):
    """The server's answer (status line, body: decoded if JSON) to a request with this Host header (None: none)."""
    host_line = "" if host is None else f"Host: {host}\r\n"
    head = f"{method} {path} HTTP/1.1\r\n{host_line}{headers}Content-Length: {len(body)}\r\n\r\n"
    answer = raw_exchange(server, head.encode() + body)
    head, _, answer_body = answer.partition(b"\r\n\r\n")
    if b"Content-Type: application/json" in head:
        answer_body = json.loads(answer_body)
    return head.split(b"\r\n")[0].decode(), answer_body


def test_requests_addressed_to_this_server_are_answered(server):
    accepted, _ = host_cases(server.server_address[1])
    for host in accepted:
        status_line, info = raw_request(server, "GET", "/api/info", host)
        assert status_line.startswith("HTTP/1.0 200"), (host, info)
        body = json.dumps({"pixels": drawing(SEVEN, size=32, width=4).tolist()}).encode()
        status_line, answer = raw_request(server, "POST", "/api/predict", host, "Content-Type: application/json\r\n",
                                          body)
        assert status_line.startswith("HTTP/1.0 200") and "probabilities" in answer, (host, answer)


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/api/info"), ("POST", "/api/predict"),
                                          ("PUT", "/api/predict")])
def test_requests_addressed_to_another_name_get_421(server, method, path):
    """A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name."""
    _, refused = host_cases(server.server_address[1])
    body = json.dumps({"pixels": rows(32, 32)}).encode() if method != "GET" else b""
    for host in refused:
        status_line, answer = raw_request(server, method, path, host, "Content-Type: application/json\r\n", body)
        assert status_line.startswith("HTTP/1.0 421"), (host, status_line, answer)
        assert "Host" in answer["error"] and "\n" not in answer["error"]
    assert_still_serving(server)


def test_two_host_headers_get_421(server):
    status_line, answer = raw_request(server, "GET", "/api/info", host_of(server), "Host: evil.example\r\n")
    assert status_line.startswith("HTTP/1.0 421") and "2 Host headers" in answer["error"]


def test_the_allowed_hosts_are_the_bound_address_loopback_and_the_name_asked_for():
    assert allowed_hosts("127.0.0.1", 8000) == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    assert allowed_hosts("0.0.0.0", 8000, "Demo.Lan") == {
        "0.0.0.0:8000", "demo.lan:8000", "127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    assert allowed_hosts("::1", 8000, "::1") == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    # on port 80 a browser leaves the port out of the Host header
    assert "localhost" in allowed_hosts("127.0.0.1", 80) and "localhost" not in allowed_hosts("127.0.0.1", 8000)


def test_a_server_on_another_loopback_address_answers_to_that_address(demo):
    try:
        context = serving(demo, "127.0.0.2")
        server = context.__enter__()
    except OSError as error:
        pytest.skip(f"cannot listen on 127.0.0.2 here: {error}")
    try:
        port = server.server_address[1]
        assert raw_request(server, "GET", "/api/info", f"127.0.0.2:{port}")[0].startswith("HTTP/1.0 200")
        assert raw_request(server, "GET", "/api/info", f"127.0.0.3:{port}")[0].startswith("HTTP/1.0 421")
    finally:
        context.__exit__(None, None, None)


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "json"])
def test_the_api_takes_only_json_415_otherwise(server, content_type):
    """What a cross-site form or a "simple" fetch can send without a preflight is refused."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"pixels": drawing(SEVEN, size=32, width=4).tolist()})
    status, _, answer = request(server, "POST", "/api/predict", body, headers)
    assert status == 415 and "application/json" in answer["error"], answer
    assert_still_serving(server)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_the_api_takes_json_with_or_without_a_charset(server, content_type):
    body = json.dumps({"pixels": drawing(SEVEN, size=32, width=4).tolist()})
    status, _, answer = request(server, "POST", "/api/predict", body, {"Content-Type": content_type})
    assert status == 200 and "probabilities" in answer, answer


# ------------------------------------------------------------------------------------------------
# the log: one line per event, control characters escaped

CONTROL = [chr(code) for code in (*range(0x20), *range(0x7f, 0xa0))]


def test_control_characters_are_escaped_in_the_log(server):
    marker = "escape-check"
    raw_exchange(server, f"GET /{marker}\x1b[2J\x1b]0;owned\x07\rforged\x85\x9b\x7f HTTP/1.1\r\n"
                         f"Host: {host_of(server)}\r\n\r\n".encode("latin-1"))
    lines = [line for line in server.log_lines if marker in line]
    assert lines
    for line in lines:
        assert not any(character in line for character in CONTROL), repr(line)
    assert any("\\x1b[2J" in line and "\\x0dforged" in line and "\\x85" in line and "\\x7f" in line
               for line in lines), lines


def test_printable_escapes_every_control_character_and_the_backslash():
    assert printable("a\x1b[2J\r\nb\\x1b\x9b\x7f\t ü") == "a\\x1b[2J\\x0d\\x0ab\\\\x1b\\x9b\\x7f\\x09 ü"


def reset_connection(connection):
    """Close with an RST (SO_LINGER on, 0 s), as a client that is killed or loses its network."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def wait_for_log(server, text, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in server.log_lines if text in line]
        if lines:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r} in {timeout_s} s: {server.log_lines}")


def test_a_client_that_resets_mid_request_is_one_log_line_and_no_traceback(small_server, capsys):
    host, port = small_server.server_address[:2]
    connection = socket.create_connection((host, port), timeout=30)
    connection.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host_of(small_server)}\r\nContent-Type: "
                       'application/json\r\nContent-Length: 1000\r\n\r\n{"pixels": [[0'.encode())
    time.sleep(0.1)               # not needed for the outcome: lets the worker wait in its read first
    reset_connection(connection)
    went_away = wait_for_log(small_server, "went away")
    assert len(went_away) == 1 and ("ConnectionResetError" in went_away[0] or "BrokenPipeError" in went_away[0])
    assert_still_serving(small_server)
    assert not any("Traceback" in line for line in small_server.log_lines)
    assert "Traceback" not in capsys.readouterr().err


def test_a_broken_pipe_while_answering_is_one_log_line(small_server, capsys):
    """What handle_error makes of a client gone while its answer is written (a race to provoke
    over a real socket, so called directly, as socketserver calls it: inside the except)."""
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        small_server.handle_error(None, ("127.0.0.9", 5))
    assert small_server.log_lines == ["127.0.0.9 went away before the answer was complete (BrokenPipeError)"]
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# a deadline for the whole request, a fixed pool of workers

def dribble(server, data, at_once=b"", interval_s=0.05):
    """Send `at_once`, then `data` one byte every interval_s while reading the answer: (answer,
    whether all of `data` had been sent when the answer was complete). Bounded: len(data) * interval_s."""
    host, port = server.server_address[:2]
    sent_all = threading.Event()
    with socket.create_connection((host, port), timeout=60) as connection:
        connection.sendall(at_once)

        def send():
            try:
                for k in range(len(data)):
                    connection.sendall(data[k:k + 1])
                    time.sleep(interval_s)
                sent_all.set()
            except OSError:          # the server answered and closed
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = connection.makefile("rb").read()
        finished_first = sent_all.is_set()
        connection.shutdown(socket.SHUT_RDWR)
    sender.join(timeout=60)
    return answer, finished_first


def test_a_request_line_and_headers_that_trickle_in_are_cut_at_the_deadline(small_server):
    """One byte every 50 ms always beats a per-read timeout; the whole request has SHORT_DEADLINE_S.
    The headers here would take 25 s to send: the answer comes long before that."""
    data = (f"GET /api/info HTTP/1.1\r\nHost: {host_of(small_server)}\r\nX-Slow: {'a' * 400}\r\n\r\n").encode()
    answer, finished_first = dribble(small_server, data)
    assert answer.startswith(b"HTTP/1.0 408") and not finished_first, answer[:200]
    assert "did not arrive within" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert_still_serving(small_server)


def test_a_body_that_trickles_in_is_cut_at_the_deadline(small_server):
    body = json.dumps({"pixels": rows(32, 32)}).encode()
    head = (f"POST /api/predict HTTP/1.1\r\nHost: {host_of(small_server)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    answer, finished_first = dribble(small_server, body, at_once=head)
    assert answer.startswith(b"HTTP/1.0 408") and not finished_first, answer[:200]
    assert "body did not arrive within" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_a_request_that_arrives_in_pieces_within_the_deadline_is_answered(server):
    """The accepted side of the deadline: pauses within the (default, 10 s) deadline are fine."""
    body = json.dumps({"pixels": drawing(SEVEN, size=32, width=4).tolist()}).encode()
    data = (f"POST /api/predict HTTP/1.1\r\nHost: {host_of(server)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        for start in range(0, len(data), len(data) // 4 + 1):
            connection.sendall(data[start:start + len(data) // 4 + 1])
            time.sleep(0.05)
        answer = connection.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 200") and b"probabilities" in answer, answer[:200]


def test_a_fixed_number_of_workers_answers_and_excess_connections_wait(small_server):
    """Five silent connections and then a real request, on two workers: no thread is made per
    connection (the two workers answer everything), the silent ones are cut at the deadline one
    pair after another, and the request waits its turn in the listen queue and is answered."""
    handled_on = set()
    finish_request = small_server.finish_request

    def recording_finish_request(request_, client_address):
        handled_on.add(threading.current_thread())
        return finish_request(request_, client_address)

    small_server.finish_request = recording_finish_request
    host, port = small_server.server_address[:2]
    silent = [socket.create_connection((host, port), timeout=60) for _ in range(5)]
    try:
        status, _, info = request(small_server, "GET", "/api/info")
        assert status == 200, info
        for connection in silent:
            assert connection.makefile("rb").read().startswith(b"HTTP/1.0 408")
    finally:
        for connection in silent:
            connection.close()
    assert len(handled_on) <= 2, handled_on


def test_excess_connections_wait_unaccepted_in_the_listen_queue(demo):
    """With both workers held by silent clients, further connections are not accepted (so no
    thread, no memory is spent on them) until a worker is free."""
    with serving(demo, workers=2, deadline_s=60) as server:
        accepted = []
        get_request = server.get_request

        def counting_get_request():
            connection = get_request()
            accepted.append(connection[1])
            return connection

        server.get_request = counting_get_request
        host, port = server.server_address[:2]
        silent = [socket.create_connection((host, port), timeout=60) for _ in range(4)]
        try:
            deadline = time.monotonic() + 30
            while len(accepted) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)           # time for a server without the limit to accept the other two as well
            assert len(accepted) == 2, accepted
        finally:
            for connection in silent:
                connection.close()


def test_closing_waits_a_bounded_time_for_workers_held_by_slow_clients(demo):
    """server_close returns while a worker still waits on a silent client (it is a daemon thread,
    so it cannot keep the process alive either): Ctrl-C is never held up by a client."""
    context = serving(demo, workers=2, deadline_s=60)
    server = context.__enter__()
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=60) as silent:
        assert_still_serving(server)          # answered after the silent connection was accepted (FIFO)
        context.__exit__(None, None, None)
        held = [worker for worker in server._workers if worker.is_alive()]
        assert len(held) == 1 and held[0].daemon
        silent.close()
    assert demo.model_thread._thread.daemon


def test_the_listen_backlog_is_deeper_than_the_default(server):
    assert server.request_queue_size == REQUEST_QUEUE_SIZE >= 64


@pytest.mark.parametrize("option, value", [("workers", 0), ("workers", 1.5), ("deadline_s", 0),
                                           ("deadline_s", float("inf")), ("deadline_s", "10")])
def test_bad_pool_options_are_refused_by_name(demo, option, value):
    with pytest.raises(ValueError, match=option):
        make_server(demo, "127.0.0.1", 0, **{option: value})


def test_one_worker_and_a_tiny_deadline_are_accepted(demo):
    with serving(demo, workers=1, deadline_s=0.001) as server:
        assert server.deadline_s == 0.001 and len(server._workers) == 1


# ------------------------------------------------------------------------------------------------
# the model on one long-lived thread

def test_every_forward_pass_runs_on_the_one_model_thread(model, monkeypatch):
    """CuPy keeps a cuBLAS handle per thread, and the layers keep per-forward caches: the warm-up,
    direct calls and simultaneous requests all run the model on the same thread, which is none of
    the callers'."""
    ran_on = []
    real_inspect = demo_api.inspect
    monkeypatch.setattr(demo_api, "inspect", lambda *args: ran_on.append(threading.current_thread())
                        or real_inspect(*args))
    demo = Demo(model)
    try:
        demo.predict(drawing(SEVEN))
        with serving(demo, workers=4) as server:
            threads = [threading.Thread(target=predict, args=(server, drawing(SEVEN, size=64, width=6)))
                       for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert len(ran_on) == 1 + 1 + 6
        assert set(ran_on) == {demo.model_thread._thread}
        assert threading.current_thread() not in ran_on
    finally:
        demo.close()
    assert not demo.model_thread._thread.is_alive()


def test_a_request_waits_for_the_model_a_bounded_time_then_gets_503(model):
    demo = Demo(model, wait_s=0.2)
    release = threading.Event()
    blocker = threading.Thread(target=demo.model_thread.run, args=(lambda: release.wait(60), 60), daemon=True)
    blocker.start()
    try:
        with pytest.raises(RequestError, match="busy") as busy:
            demo.predict(drawing(SEVEN))
        assert busy.value.status == 503
    finally:
        release.set()
        blocker.join(timeout=60)
    assert demo.predict(drawing(SEVEN))["blank"] is False          # the model thread serves on
    demo.close()


def test_an_error_on_the_model_thread_reaches_the_request_and_the_thread_serves_on(model, monkeypatch):
    demo = Demo(model)
    monkeypatch.setattr(demo_api, "inspect", broken_model)
    with pytest.raises(FloatingPointError):
        demo.predict(drawing(SEVEN))
    monkeypatch.undo()
    assert demo.predict(drawing(SEVEN))["blank"] is False
    demo.close()
