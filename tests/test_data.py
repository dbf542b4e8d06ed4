"""Tests for scratchvit.data: IDX files, load_mnist (folder, cache, download), normalize, random_shift.

Everything runs on tiny synthetic files under tmp_path; downloads go to an HTTP server on 127.0.0.1.
"""
import gzip
import hashlib
import http.server
import os
import socket
import threading

import numpy
import pytest

from scratchvit import data
from scratchvit.backend import get_backend
from scratchvit.cupy_check import BackendUnavailable
from scratchvit.data import (BACKGROUND, MNIST_FILES, MNIST_MEAN, MNIST_STD, DataError, load_mnist, normalize,
                             random_shift, read_idx, shift_images, write_idx)

IMAGE_HEIGHT, IMAGE_WIDTH = 6, 5   # not square, so a swapped height/width shows


def synthetic_arrays(seed=0, train_count=12, test_count=4):
    rng = numpy.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(train_count, IMAGE_HEIGHT, IMAGE_WIDTH), dtype=numpy.uint8),
        "train_labels": rng.integers(0, 10, size=train_count, dtype=numpy.uint8),
        "test_images": rng.integers(0, 256, size=(test_count, IMAGE_HEIGHT, IMAGE_WIDTH), dtype=numpy.uint8),
        "test_labels": rng.integers(0, 10, size=test_count, dtype=numpy.uint8),
    }


def write_dataset(folder, arrays, gzipped=("train_images", "test_labels")):
    folder.mkdir(parents=True, exist_ok=True)
    for key, file_name in MNIST_FILES.items():
        write_idx(folder / (file_name + (".gz" if key in gzipped else "")), arrays[key])


def assert_same_arrays(loaded, expected):
    assert set(loaded) == set(MNIST_FILES)
    for key in MNIST_FILES:
        assert loaded[key].dtype == numpy.uint8
        numpy.testing.assert_array_equal(loaded[key], expected[key])


def assert_one_line_naming(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)


# ---------------------------------------------------------------------------------------------
# read_idx / write_idx
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 2)])
def test_write_read_round_trip(tmp_path, suffix, shape):
    array = numpy.random.default_rng(1).integers(0, 256, size=shape, dtype=numpy.uint8)
    path = tmp_path / ("file" + suffix)
    write_idx(path, array)
    assert path.read_bytes().startswith(b"\x1f\x8b") == (suffix == ".gz")
    loaded = read_idx(path)
    assert loaded.dtype == numpy.uint8 and loaded.shape == shape
    numpy.testing.assert_array_equal(loaded, array)
    loaded[...] = 0   # the returned array is writable
    assert sorted(os.listdir(tmp_path)) == [path.name]   # no temporary file left behind


def test_idx_layout_matches_the_format(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, numpy.array([3, 1, 255], dtype=numpy.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 255])
    images = numpy.arange(2 * 3 * 4, dtype=numpy.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images", images)
    assert (tmp_path / "images").read_bytes() == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + bytes(range(24))


def test_gzip_is_detected_by_magic_not_by_suffix(tmp_path):
    array = numpy.arange(10, dtype=numpy.uint8)
    write_idx(tmp_path / "a.gz", array)
    disguised = tmp_path / "no-suffix"
    disguised.write_bytes((tmp_path / "a.gz").read_bytes())
    numpy.testing.assert_array_equal(read_idx(disguised), array)


def test_write_idx_converts_small_integers_and_rejects_bad_arrays(tmp_path):
    write_idx(tmp_path / "labels", numpy.array([0, 9, 255], dtype=numpy.int64))
    numpy.testing.assert_array_equal(read_idx(tmp_path / "labels"), [0, 9, 255])
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", numpy.zeros((2, 2), dtype=numpy.uint8))
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", numpy.array([0, 256]))
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", numpy.array([0.5]))


def test_write_idx_leaves_no_partial_file_when_the_final_rename_fails(tmp_path, monkeypatch):
    def failing_replace(source, destination):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_idx(tmp_path / "images.gz", numpy.zeros((2, 3, 3), dtype=numpy.uint8))
    assert os.listdir(tmp_path) == []


def idx_header(dimensions, type_code=8):
    return bytes([0, 0, type_code, len(dimensions)]) + b"".join(d.to_bytes(4, "big") for d in dimensions)


BAD_FILES = {
    "bad magic": (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc", None, "magic"),
    "wrong type code": (idx_header([3], type_code=0x0D) + b"abc", None, "type code 0x0d"),
    "wrong number of dims": (idx_header([3]) + b"abc", 3, "declares 1 dimensions"),
    "zero dims": (bytes([0, 0, 8, 0]), None, "0 dimensions"),
    "too short for a magic": (b"\x00\x00", None, "2 bytes"),
    "truncated header": (idx_header([2, 3, 3])[:10], None, "truncated"),
    "truncated payload": (idx_header([2, 3, 3]) + bytes(17), None, "truncated: header says 2 images of 3x3 (18 bytes)"),
    "trailing bytes": (idx_header([4]) + bytes(6), None, "2 unexpected trailing bytes"),
    "corrupt gzip": (gzip.compress(idx_header([4]) + bytes(4))[:12] + b"garbage garbage", None, "corrupt gzip"),
    "truncated gzip": (gzip.compress(idx_header([40]) + bytes(range(40)))[:-12], None, "corrupt gzip"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_idx_files_raise_data_error_naming_the_file(tmp_path, case):
    content, ndim, expected_text = BAD_FILES[case]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_idx(path, ndim)
    assert_one_line_naming(error, path, expected_text)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError) as error:
        read_idx(tmp_path / "nothing-here")
    assert_one_line_naming(error, tmp_path / "nothing-here", "cannot read")


# ---------------------------------------------------------------------------------------------
# load_mnist from a folder
# ---------------------------------------------------------------------------------------------

def test_load_from_folder_with_a_mix_of_gz_and_raw_files(tmp_path):
    arrays = synthetic_arrays()
    write_dataset(tmp_path / "mnist", arrays)
    assert_same_arrays(load_mnist(str(tmp_path / "mnist")), arrays)


def test_load_from_folder_needs_no_checksums_or_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fetch_url", lambda url, timeout: pytest.fail("must not download"))
    arrays = synthetic_arrays(seed=5)
    write_dataset(tmp_path, arrays, gzipped=())
    assert_same_arrays(load_mnist(tmp_path), arrays)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_and_label_counts_must_match(tmp_path, split):
    arrays = synthetic_arrays()
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:-1]
    write_dataset(tmp_path, arrays, gzipped=())
    image_count = len(arrays[f"{split}_images"])
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    assert_one_line_naming(error, MNIST_FILES[f"{split}_images"], MNIST_FILES[f"{split}_labels"],
                           f"{image_count} images", f"{image_count - 1} labels")


def test_train_and_test_images_must_have_the_same_size(tmp_path):
    arrays = synthetic_arrays()
    arrays["test_images"] = arrays["test_images"][:, :, :4]
    write_dataset(tmp_path, arrays)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    assert_one_line_naming(error, MNIST_FILES["test_images"], "6x4", "6x5")


def test_labels_file_in_place_of_images_is_rejected(tmp_path):
    arrays = synthetic_arrays()
    arrays["train_images"] = arrays["train_labels"]
    write_dataset(tmp_path, arrays, gzipped=())
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    assert_one_line_naming(error, tmp_path / MNIST_FILES["train_images"], "declares 1 dimensions")


def test_missing_folder_message(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path / "not-there")
    assert_one_line_naming(error, tmp_path / "not-there", "--data-dir", *MNIST_FILES.values())


def test_missing_file_message(tmp_path):
    write_dataset(tmp_path, synthetic_arrays())
    os.remove(tmp_path / (MNIST_FILES["test_labels"] + ".gz"))
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    assert_one_line_naming(error, tmp_path / MNIST_FILES["test_labels"], "missing", *MNIST_FILES.values())


# ---------------------------------------------------------------------------------------------
# load_mnist from the cache, downloading from a local HTTP server
# ---------------------------------------------------------------------------------------------

class MirrorServer:
    """An HTTP server on 127.0.0.1 serving `routes` (path -> bytes) and recording every request path."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, prefix):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{prefix}/"

    def publish(self, prefix, arrays):
        for key, file_name in MNIST_FILES.items():
            raw = data.idx_bytes(arrays[key])
            self.routes[f"/{prefix}/{file_name}.gz"] = gzip.compress(raw)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def mirror_server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = MirrorServer()
    yield server
    server.close()


def md5_of_arrays(arrays):
    return {file_name: hashlib.md5(data.idx_bytes(arrays[key])).hexdigest() for key, file_name in MNIST_FILES.items()}


def test_download_into_cache_then_reuse_without_fetching(tmp_path, mirror_server):
    arrays = synthetic_arrays()
    mirror_server.publish("good", arrays)
    cache = tmp_path / "cache" / "mnist"
    options = dict(cache_dir=cache, mirrors=[mirror_server.url("good")], checksums=md5_of_arrays(arrays), log=None)

    assert_same_arrays(load_mnist(**options), arrays)
    assert sorted(mirror_server.requests) == sorted(f"/good/{name}.gz" for name in MNIST_FILES.values())
    assert sorted(os.listdir(cache)) == sorted(name + ".gz" for name in MNIST_FILES.values())

    mirror_server.requests.clear()
    assert_same_arrays(load_mnist(**options), arrays)
    assert mirror_server.requests == []


def test_checksum_failure_on_first_mirror_falls_through_to_the_next(tmp_path, mirror_server):
    arrays = synthetic_arrays()
    mirror_server.publish("tampered", synthetic_arrays(seed=99))
    mirror_server.publish("good", arrays)
    mirrors = [mirror_server.url("tampered"), mirror_server.url("good")]
    loaded = load_mnist(cache_dir=tmp_path, mirrors=mirrors, checksums=md5_of_arrays(arrays), log=None)
    assert_same_arrays(loaded, arrays)
    assert len(mirror_server.requests) == 8
    assert sum(path.startswith("/tampered/") for path in mirror_server.requests) == 4
    assert sorted(os.listdir(tmp_path)) == sorted(name + ".gz" for name in MNIST_FILES.values())


def test_every_mirror_failing_raises_one_line_error_and_leaves_no_files(tmp_path, mirror_server):
    arrays = synthetic_arrays()
    mirror_server.publish("tampered", synthetic_arrays(seed=99))
    mirror_server.routes["/corrupt/" + MNIST_FILES["train_images"] + ".gz"] = b"\x1f\x8bnot really gzip"
    mirrors = [mirror_server.url("missing"), mirror_server.url("corrupt"), mirror_server.url("tampered")]
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        load_mnist(cache_dir=cache, mirrors=mirrors, checksums=md5_of_arrays(arrays), log=None)
    assert_one_line_naming(error, cache / (MNIST_FILES["train_images"] + ".gz"), "3 mirror(s)",
                           "checksum mismatch", "--data-dir", str(cache))
    assert len(mirror_server.requests) == 3
    assert os.listdir(cache) == []


def test_unreachable_mirror_is_reported(tmp_path, mirror_server):
    with socket.socket() as bound_not_listening:   # connections to its port are refused
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        with pytest.raises(DataError) as error:
            load_mnist(cache_dir=tmp_path, mirrors=[f"http://127.0.0.1:{port}/mnist/"], log=None)
    assert_one_line_naming(error, f"127.0.0.1:{port}/mnist/", "could not download", "--data-dir")
    assert os.listdir(tmp_path) == []


def test_failed_write_of_a_download_leaves_no_partial_file(tmp_path, monkeypatch):
    arrays = synthetic_arrays()
    bodies = {f"https://mirror.invalid/{name}.gz": gzip.compress(data.idx_bytes(arrays[key]))
              for key, name in MNIST_FILES.items()}
    monkeypatch.setattr(data, "fetch_url", lambda url, timeout: bodies[url])

    def interrupted_replace(source, destination):
        raise OSError("interrupted")
    monkeypatch.setattr(data.os, "replace", interrupted_replace)
    with pytest.raises(DataError) as error:
        load_mnist(cache_dir=tmp_path, mirrors=["https://mirror.invalid"], checksums=md5_of_arrays(arrays), log=None)
    assert_one_line_naming(error, tmp_path, "cannot write")
    assert os.listdir(tmp_path) == []


def test_fetch_url_is_the_only_network_entry_point(tmp_path, monkeypatch):
    arrays = synthetic_arrays()
    fetched = []

    def fake_fetch(url, timeout):
        fetched.append(url)
        name = url.rsplit("/", 1)[1][:-3]
        key = next(key for key, file_name in MNIST_FILES.items() if file_name == name)
        return gzip.compress(data.idx_bytes(arrays[key]))

    monkeypatch.setattr(data, "fetch_url", fake_fetch)
    logged = []
    loaded = load_mnist(cache_dir=tmp_path, mirrors=["https://example.invalid/base"],   # no trailing slash
                        checksums=md5_of_arrays(arrays), log=logged.append)
    assert_same_arrays(loaded, arrays)
    assert sorted(fetched) == sorted(f"https://example.invalid/base/{name}.gz" for name in MNIST_FILES.values())
    assert len(logged) == 4


def test_corrupt_cached_file_is_fetched_again(tmp_path, monkeypatch):
    arrays = synthetic_arrays()
    write_dataset(tmp_path, arrays, gzipped=list(MNIST_FILES))
    (tmp_path / (MNIST_FILES["test_images"] + ".gz")).write_bytes(b"\x1f\x8b broken")
    fetched = []

    def fake_fetch(url, timeout):
        fetched.append(url)
        return gzip.compress(data.idx_bytes(arrays["test_images"]))

    monkeypatch.setattr(data, "fetch_url", fake_fetch)
    loaded = load_mnist(cache_dir=tmp_path, mirrors=["https://example.invalid/"], checksums=md5_of_arrays(arrays),
                        log=None)
    assert_same_arrays(loaded, arrays)
    assert fetched == [f"https://example.invalid/{MNIST_FILES['test_images']}.gz"]


def test_raw_files_placed_in_the_cache_by_hand_are_used(tmp_path, monkeypatch):
    arrays = synthetic_arrays()
    write_dataset(tmp_path, arrays, gzipped=())
    monkeypatch.setattr(data, "fetch_url", lambda url, timeout: pytest.fail("must not download"))
    assert_same_arrays(load_mnist(cache_dir=tmp_path, checksums=md5_of_arrays(arrays), log=None), arrays)


def test_download_disabled_with_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fetch_url", lambda url, timeout: pytest.fail("must not download"))
    with pytest.raises(DataError) as error:
        load_mnist(cache_dir=tmp_path / "empty", download=False)
    assert_one_line_naming(error, tmp_path / "empty", "downloading is off", "--data-dir")
    assert not (tmp_path / "empty").exists()


def test_default_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "scratchvit" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "scratchvit" / "mnist"


def test_published_checksums_are_md5_hex_for_every_file():
    assert set(data.MNIST_MD5) == set(MNIST_FILES.values())
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in data.MNIST_MD5.values())


# ---------------------------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------------------------

def test_normalize_exact_values_shape_and_dtype():
    images = numpy.array([[[0, 255], [51, 128]]], dtype=numpy.uint8)   # (1, 2, 2)
    normalized = normalize(images, get_backend("cpu"))
    assert normalized.shape == (1, 1, 2, 2) and normalized.dtype == numpy.float32
    expected = (images / 255.0 - MNIST_MEAN) / MNIST_STD
    numpy.testing.assert_allclose(normalized[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert normalized[0, 0, 0, 0] == pytest.approx(BACKGROUND, abs=1e-6)
    assert normalized[0, 0, 0, 1] == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    assert normalize(images, "cpu", dtype="float64").dtype == numpy.float64
    assert images.dtype == numpy.uint8 and images[0, 0, 1] == 255   # input untouched


def test_normalize_keeps_rows_and_columns_of_a_non_square_batch():
    """(N, H, W) = (2, 2, 3): every pixel lands at [n, 0, row, column], with its exact value; a square
    image could not tell rows from columns."""
    images = numpy.arange(12, dtype=numpy.uint8).reshape(2, 2, 3) * 20       # pixel n*6 + row*3 + column, x20
    normalized = normalize(images, "cpu", dtype="float64")
    assert normalized.shape == (2, 1, 2, 3)
    for n, row, column in numpy.ndindex(2, 2, 3):
        pixel = 20 * (n * 6 + row * 3 + column)
        assert normalized[n, 0, row, column] == (pixel / 255 - MNIST_MEAN) / MNIST_STD


# ---------------------------------------------------------------------------------------------
# shift_images / random_shift
# ---------------------------------------------------------------------------------------------

def shift_reference(images, shifts, fill):
    """The slow, obvious version: every output pixel looks up its source pixel one at a time."""
    batch, channels, height, width = images.shape
    shifted = numpy.empty_like(images)
    for b in range(batch):
        dy, dx = int(shifts[b][0]), int(shifts[b][1])
        for y in range(height):
            for x in range(width):
                source_y, source_x = y - dy, x - dx
                inside = 0 <= source_y < height and 0 <= source_x < width
                shifted[b, :, y, x] = images[b, :, source_y, source_x] if inside else fill
    return shifted


def test_shift_images_matches_the_per_pixel_reference():
    images = numpy.random.default_rng(2).standard_normal((7, 2, 6, 5)).astype(numpy.float32)
    shifts = numpy.array([[0, 0], [1, 0], [0, -1], [-2, 3], [2, 2], [6, 0], [-3, -5]])  # last two: shifted out
    before = images.copy()
    shifted = shift_images(images, shifts, fill=-7.0)
    numpy.testing.assert_array_equal(shifted, shift_reference(images, shifts, -7.0))
    assert shifted.dtype == numpy.float32
    numpy.testing.assert_array_equal(images, before)
    numpy.testing.assert_array_equal(shifted[1, :, 1:], images[1, :, :-1])   # dy=+1 moves content down
    assert numpy.all(shifted[1, :, 0] == -7.0)


def test_random_shift_matches_reference_with_the_same_draws():
    images = normalize(numpy.random.default_rng(3).integers(0, 256, (16, 6, 5), dtype=numpy.uint8), "cpu")
    before = images.copy()
    shifted = random_shift(images, 2, numpy.random.default_rng(42))
    shifts = numpy.random.default_rng(42).integers(-2, 3, size=(16, 2))
    assert shifts.min() >= -2 and shifts.max() <= 2 and len(numpy.unique(shifts)) > 1
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    numpy.testing.assert_array_equal(shifted, shift_reference(images, shifts, numpy.float32(BACKGROUND)))
    numpy.testing.assert_array_equal(images, before)
    assert shifted is not images


def test_random_shift_zero_is_identity_and_fill_can_be_overridden():
    images = numpy.random.default_rng(4).standard_normal((3, 1, 4, 4)).astype(numpy.float32)
    numpy.testing.assert_array_equal(random_shift(images, 0, numpy.random.default_rng(0)), images)
    shifted = random_shift(images, 4, numpy.random.default_rng(0), fill=0.0)
    shifts = numpy.random.default_rng(0).integers(-4, 5, size=(3, 2))
    numpy.testing.assert_array_equal(shifted, shift_reference(images, shifts, 0.0))


@pytest.mark.parametrize("max_shift", [-1, 1.5, -0.5])
def test_random_shift_refuses_a_range_that_is_not_a_whole_number_of_pixels(max_shift):
    images = numpy.zeros((2, 1, 4, 4), dtype=numpy.float32)
    with pytest.raises(ValueError, match=rf"max_shift must be a non-negative integer, got {max_shift}"):
        random_shift(images, max_shift, numpy.random.default_rng(0))


def test_random_shift_draws_up_to_and_including_max_shift():
    """The accepted boundary: shifts of exactly ±max_shift occur (the range is inclusive), never more;
    a whole-number float such as 1.0 is a shift of 1."""
    images = numpy.random.default_rng(7).standard_normal((64, 1, 5, 4))
    for max_shift in (1, 1.0):
        shifted = random_shift(images, max_shift, numpy.random.default_rng(8), fill=0.0)
        shifts = numpy.random.default_rng(8).integers(-1, 2, size=(64, 2))
        assert shifts.min() == -1 and shifts.max() == 1                      # both ends drawn
        numpy.testing.assert_array_equal(shifted, shift_reference(images, shifts, 0.0))


@pytest.mark.gpu
def test_gpu_shift_and_normalize_match_cpu():
    pytest.importorskip("cupy")
    try:
        gpu = get_backend("gpu")
    except BackendUnavailable as error:
        pytest.skip(str(error))
    pixels = numpy.random.default_rng(5).integers(0, 256, (8, 6, 5), dtype=numpy.uint8)
    images_cpu = normalize(pixels, "cpu")
    images_gpu = normalize(pixels, gpu)
    assert gpu.xp.get_array_module(images_gpu) is gpu.xp and images_gpu.dtype == numpy.float32
    numpy.testing.assert_allclose(images_gpu.get(), images_cpu, rtol=1e-6, atol=1e-6)
    shifts = numpy.random.default_rng(6).integers(-2, 3, size=(8, 2))
    shifted_gpu = shift_images(images_gpu, gpu.asarray(shifts))
    numpy.testing.assert_array_equal(shifted_gpu.get(), shift_images(images_gpu.get(), shifts))
    drawn = random_shift(images_gpu, 2, gpu.random_generator(0))
    assert gpu.xp.get_array_module(drawn) is gpu.xp and drawn.shape == images_gpu.shape
    assert drawn.dtype == images_gpu.dtype
