"""The demo's HTTP API (scratchvit/demo), served in-process on a free port, and its command line.

The model is a tiny ViT (28x28 images, patch 7: a 4x4 patch grid, dim 16, two layers of two heads),
built, saved with scratchvit.train.save_checkpoint and loaded back through
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
import threading
from pathlib import Path

import numpy
import pytest

from conftest import GPU_SKIP_REASON, on_gpu
from scratchvit.optim import AdamW
from scratchvit.train import TrainConfig, save_checkpoint
from scratchvit.vit import ViT

if importlib.util.find_spec("PIL") is None:
    pytest.skip("the demo's MNIST-style preprocessing needs Pillow: pip install Pillow", allow_module_level=True)

import scratchvit.preprocess as preprocess
from scratchvit.attention_maps import inspect
from scratchvit.demo import MAX_BODY_BYTES, Demo, make_server
from scratchvit.demo.api import MAX_SIDE
from scratchvit.demo.server import STATIC_FILES
from scratchvit.predict import load_trained_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)
GRID = 28 // TINY_MODEL["patch_size"]
PAD = 280                  # the page's canvas size


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
def server(model):
    log = []
    server = make_server(Demo(model), "127.0.0.1", 0, log=log.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.log_lines = log
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def request(server, method, path, body=None, headers=None):
    """(status, headers, decoded JSON or raw bytes) for one request on a fresh connection."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
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
    """The server adds nothing of its own: its numbers are attention_maps.inspect on the preprocessing's output."""
    pixels = drawing(SEVEN)
    expected = inspect(model, preprocess.to_model_input(preprocess.mnist_style(pixels)[None]))
    for layer in range(TINY_MODEL["depth"]):
        _, _, answer = predict(server, pixels, layer=layer)
        numpy.testing.assert_allclose(answer["probabilities"], expected["probabilities"][0], rtol=0, atol=1e-6)
        numpy.testing.assert_allclose(answer["rollout"], expected["rollout"][0], rtol=0, atol=1e-6)
        numpy.testing.assert_allclose(answer["heads"], expected["heads"][0, layer], rtol=0, atol=1e-6)
        numpy.testing.assert_array_equal(answer["input"], numpy.rint(preprocess.mnist_style(pixels)))


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
    status, _, answer = request(server, "POST", "/api/predict", b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and "over the limit" in answer["error"]
    assert_still_serving(server)


def test_a_huge_announced_body_is_refused_unread(server):
    """A Content-Length of 1 TB, with no body sent: answered at once, not waited for."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        answer = connection.makefile("rb").read()       # the client keeps its side open: no EOF to wait for
    assert answer.startswith(b"HTTP/1.0 413") and b'"error"' in answer
    assert_still_serving(server)


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
    answer = raw_exchange(server, f"POST /api/predict HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.0 {status}".encode()), head
    assert says in json.loads(body)["error"]
    assert_still_serving(server)


def test_a_body_shorter_than_announced_gets_400(server):
    answer = raw_exchange(server, b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pixels\": ")
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


def test_the_command_serves_on_loopback_writes_nothing_and_stops_on_ctrl_c(checkpoint, tmp_path):
    process = start_cli(checkpoint, tmp_path, "--port", "0", "--quiet")
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split()[line.split().index("demo:") + 1]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/api/predict", json.dumps({"pixels": drawing(SEVEN).tolist()}))
        answer = json.loads(connection.getresponse().read())
        connection.close()
        assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
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
