"""MNIST on disk and on the device: read/write IDX files, download with checksums, normalise, augment.

The IDX format
    MNIST ships as four IDX files (usually gzipped). An IDX file is a tiny header and then raw bytes:

        bytes 0-1   0x00 0x00            always zero
        byte  2     type code            0x08 = unsigned byte (the only type MNIST uses)
        byte  3     number of dimensions 3 for images (count, rows, columns), 1 for labels (count)
        then        one big-endian uint32 per dimension
        then        the payload: product(dimensions) values, row-major (C order)

    So the training images file is 16 + 60000·28·28 bytes and the training labels file 8 + 60000.
    `read_idx` checks every part of that and raises `DataError` for anything else: a wrong magic,
    a truncated payload, trailing bytes, a corrupt gzip stream. A gzipped file is inflated only as far
    as its header says (`decompress_if_gzip`), so a header promising more than the file can hold, or a
    stream inflating to more than the header says (a gzip bomb), is refused before taking that memory.
    Labels must be 0-9 (`check_dataset`): a label outside names the file and its first index.

Where the data comes from
    `load_mnist(data_dir)` reads the four files from a folder (any dataset in MNIST's format works:
    Fashion-MNIST, small synthetic sets). `load_mnist()` uses a cache folder and downloads what is
    missing from a list of mirrors, checking the MD5 of the decompressed content and writing each
    file atomically (temporary file + `os.replace`), so an interrupted run never leaves half a file.

On the device
    `normalize` uploads the uint8 images once and scales them to zero mean / unit variance with
    MNIST's statistics, giving (N, 1, H, W). `random_shift` translates each image of a batch by its
    own random (dy, dx), fully batched: one gather with computed indices, no loop over images.
    Both take the array module from their input or the backend, so they run on NumPy or CuPy alike.
"""
import gzip
import hashlib
import http.client
import os
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy

from .backend import get_array_module, get_backend
from .twins import dispatched


class DataError(Exception):
    """A problem with the data files; the message is one line naming the file and what is wrong."""


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# MD5 of the DECOMPRESSED files, keyed by file name (the values of MNIST_FILES).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Base URLs tried in turn; each file is fetched as base + NAME + ".gz".
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

MNIST_MEAN = 0.1307   # mean pixel of the MNIST training set, on a 0..1 scale
MNIST_STD = 0.3081    # its standard deviation
BACKGROUND = (0 - MNIST_MEAN) / MNIST_STD   # a black pixel after `normalize`

DOWNLOAD_TIMEOUT_S = 60
IDX_TYPE_UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
# deflate emits at least one bit per 258 repeated bytes, plus block overhead: no stream inflates by more than
# 1032:1 (zlib's technical details, https://zlib.net/zlib_tech.html, "Maximum Compression Factor")
DEFLATE_MAX_RATIO = 1032
NUM_CLASSES = 10      # MNIST's digits, and every dataset in its format (Fashion-MNIST, KMNIST): labels 0-9
EXPECTED_DIMENSIONS = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}


def file_list():
    return ", ".join(MNIST_FILES.values())


def one_line(text):
    """Collapse whitespace so an error reason cannot break the one-line message."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

def decompress_if_gzip(data, path, ndim=None):
    """The bytes of an IDX file, gunzipped if they start with the gzip magic (whatever the suffix).

    Never more than the IDX header declares: the header is inflated first and checked (`idx_header`, with
    `ndim` when given), the size it declares must fit in what deflate can expand the file's bytes to
    (DEFLATE_MAX_RATIO), and then only that many bytes and one more are inflated. A file whose header
    promises more than it can hold, or a stream that inflates past its header (a gzip bomb), is refused
    before its memory is taken."""
    if not data.startswith(GZIP_MAGIC):
        return data
    start = gunzip_at_most(data, 4, path)
    if len(start) < 4:
        return start                                    # parse_idx says what is missing
    header = gunzip_at_most(data, 4 + 4 * start[3], path)
    dimensions, header_size, expected_size = idx_header(header, path, ndim)
    total = header_size + expected_size
    if expected_size > DEFLATE_MAX_RATIO * len(data):
        raise DataError(f"{path}: header says {describe_shape(dimensions)} ({expected_size:,} bytes), more than "
                        f"{len(data):,} gzipped bytes can hold (deflate expands at most {DEFLATE_MAX_RATIO}-fold): "
                        f"damaged or crafted")
    content = gunzip_at_most(data, total + 1, path)
    if len(content) > total:
        raise DataError(f"{path}: the gzip stream inflates to more than the {total:,} bytes its IDX header "
                        f"declares ({describe_shape(dimensions)}): unexpected trailing data")
    return content


def gunzip_at_most(data, limit, path):
    """The first `limit` bytes (or fewer, if it is shorter) of the gzip file `data` decompressed, inflating no
    more than that: zlib's max_length bounds each call. Several gzip members follow one another, as gunzip
    reads them; a stream cut short or corrupt is a DataError."""
    output = bytearray()
    pending = data
    try:
        while pending and len(output) < limit:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)         # 16 +: a gzip header and trailer
            output += inflater.decompress(pending, limit - len(output))
            while not inflater.eof and inflater.unconsumed_tail and len(output) < limit:
                output += inflater.decompress(inflater.unconsumed_tail, limit - len(output))
            if len(output) >= limit:
                break
            if not inflater.eof:
                raise DataError(f"{path}: corrupt gzip data (the compressed stream ends before its end marker)")
            pending = inflater.unused_data.lstrip(b"\x00")       # zero padding after a member, as gzip skips it
    except zlib.error as error:
        raise DataError(f"{path}: corrupt gzip data ({one_line(error)})") from None
    return bytes(output[:limit])


def describe_shape(dimensions):
    if len(dimensions) == 3:
        return f"{dimensions[0]} images of {dimensions[1]}x{dimensions[2]}"
    if len(dimensions) == 1:
        return f"{dimensions[0]} labels"
    return f"an array of shape {tuple(dimensions)}"


def idx_header(data, path, ndim=None):
    """(dimensions, header size, payload size in bytes) from the first bytes of an IDX file, or DataError
    (see parse_idx). Reads only the header: `data` may hold the whole file or just its start."""
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes, shorter than the 4-byte magic number")
    zero_bytes, type_code, dimension_count = data[0:2], data[2], data[3]
    if zero_bytes != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file: magic number starts with {data[0:2].hex()} instead of 0000")
    if type_code != IDX_TYPE_UNSIGNED_BYTE:
        raise DataError(f"{path}: unsupported IDX type code 0x{type_code:02x} "
                        f"(only 0x08, unsigned byte, is supported)")
    if dimension_count == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    if ndim is not None and dimension_count != ndim:
        expected = {3: "3 (count, rows, columns) for images", 1: "1 (count) for labels"}.get(ndim, ndim)
        raise DataError(f"{path}: IDX header declares {dimension_count} dimensions, expected {expected}")

    header_size = 4 + 4 * dimension_count
    if len(data) < header_size:
        raise DataError(f"{path}: truncated: the header needs {header_size} bytes "
                        f"for {dimension_count} dimensions but the file holds {len(data)} bytes")
    dimensions = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dimension_count)]
    expected_size = 1
    for size in dimensions:
        expected_size *= size
    return dimensions, header_size, expected_size


def parse_idx(data, path, ndim=None):
    """Parse the (already decompressed) bytes of an IDX file into a uint8 array.

    `path` only names the file in error messages; `ndim`, if given, is the number of dimensions the
    header must declare (3 for images, 1 for labels).
    """
    dimensions, header_size, expected_size = idx_header(data, path, ndim)
    payload_size = len(data) - header_size
    if payload_size < expected_size:
        raise DataError(f"{path}: truncated: header says {describe_shape(dimensions)} ({expected_size} bytes) "
                        f"but the file holds {payload_size} bytes after the {header_size}-byte header")
    if payload_size > expected_size:
        raise DataError(f"{path}: {payload_size - expected_size} unexpected trailing bytes: header says "
                        f"{describe_shape(dimensions)} ({expected_size} bytes) "
                        f"but the file holds {payload_size} bytes after the {header_size}-byte header")
    # copy: frombuffer over bytes is read-only, callers may want to write into their arrays
    return numpy.frombuffer(data, dtype=numpy.uint8, offset=header_size).reshape(dimensions).copy()


def read_bytes(path):
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {one_line(error.strerror or error)}") from None


def read_idx(path, ndim=None):
    """Read an IDX file (raw, or gzipped: detected by the gzip magic bytes) into a uint8 NumPy array.

    Raises DataError naming the file for a bad magic number, an unsupported type code, a number of
    dimensions other than `ndim` (when given), a truncated payload, trailing bytes or corrupt gzip.
    """
    return parse_idx(decompress_if_gzip(read_bytes(path), path, ndim), path, ndim)


def atomic_write_bytes(path, data):
    """Write `data` to `path` via a temporary file in the same folder, flushed to disk, and `os.replace`.

    Readers see either the old file or the complete new one, never a partial write, even after a
    crash; on any failure the temporary file is removed. Missing parent folders are created.
    (Also how training writes its checkpoints.) The file gets the permissions a plain `open()` would
    give it (0666 less the umask: 0644 under the usual 022), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = create_temporary_file(path)
    try:
        with os.fdopen(descriptor, "wb") as temporary_file:
            temporary_file.write(data)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        try:
            os.remove(temporary_name)
        except OSError:
            pass
        raise


def create_temporary_file(path, attempts=100):
    """(descriptor, name) of a new file ".NAME.RANDOM.part" beside `path`, opened for writing.

    Created as mkstemp does (O_EXCL: a new file of our own, never one planted there or a link's
    target) but with mode 0666, which the kernel reduces by the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(attempts):
        name = path.parent / f".{path.name}.{os.urandom(6).hex()}.part"
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name beside {path} after {attempts} attempts")


def idx_bytes(array):
    """The raw IDX encoding of a uint8 array of 1 or 3 dimensions."""
    array = numpy.asarray(array)
    if array.ndim not in (1, 3):
        raise ValueError(f"write_idx writes arrays of 1 (labels) or 3 (images) dimensions, got shape {array.shape}")
    if array.dtype != numpy.uint8:
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"write_idx writes unsigned bytes: need integers in 0..255, got dtype {array.dtype}")
        array = array.astype(numpy.uint8)
    header = bytes([0, 0, IDX_TYPE_UNSIGNED_BYTE, array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + numpy.ascontiguousarray(array).tobytes()


def write_idx(path, array):
    """Write a uint8 array (1-D labels or 3-D images) as an IDX file, gzipped if `path` ends with .gz.

    Integer arrays with values in 0..255 are converted to uint8. The file is written atomically.
    """
    data = idx_bytes(array)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# Loading MNIST: from a folder, or from the cache (downloading what is missing)
# ---------------------------------------------------------------------------------------------

def default_cache_dir():
    """$XDG_CACHE_HOME/scratchvit/mnist, or ~/.cache/scratchvit/mnist."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "scratchvit" / "mnist"


def fetch_url(url, timeout):
    """The body of `url` as bytes. Tests replace this function to count or fake downloads."""
    request = urllib.request.Request(url, headers={"User-Agent": "scratchvit (python urllib)"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def md5_hex(data):
    return hashlib.md5(data).hexdigest()


def mirror_url(mirror, file_name):
    return mirror + ("" if mirror.endswith("/") else "/") + file_name + ".gz"


def check_dataset(arrays, paths):
    """Images 3-D and labels 1-D (read_idx checked), counts match, train and test share H×W."""
    for split in ("train", "test"):
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        image_count, label_count = len(arrays[images_key]), len(arrays[labels_key])
        if image_count != label_count:
            raise DataError(f"{paths[images_key]}: holds {image_count} images but {paths[labels_key]} "
                            f"holds {label_count} labels; the two counts must match")
        if image_count == 0:
            raise DataError(f"{paths[images_key]}: holds no images")
    for key in ("train_labels", "test_labels"):
        outside = numpy.flatnonzero(arrays[key] >= NUM_CLASSES)
        if outside.size:
            index = int(outside[0])
            raise DataError(f"{paths[key]}: label {int(arrays[key][index])} at index {index} is outside "
                            f"0-{NUM_CLASSES - 1} (a dataset in MNIST's format has {NUM_CLASSES} classes)")
    train_size = arrays["train_images"].shape[1:]
    test_size = arrays["test_images"].shape[1:]
    if train_size != test_size:
        raise DataError(f"{paths['test_images']}: test images are {test_size[0]}x{test_size[1]} but the "
                        f"training images in {paths['train_images']} are {train_size[0]}x{train_size[1]}")


def load_from_folder(data_dir):
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; --data-dir should point at a folder "
                        f"holding the four MNIST-format files {file_list()} (each may be gzipped as NAME.gz)")
    arrays, paths = {}, {}
    for key, file_name in MNIST_FILES.items():
        candidates = [folder / file_name, folder / (file_name + ".gz")]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            raise DataError(f"{folder / file_name}: missing (no {file_name} or {file_name}.gz in {folder}); "
                            f"the data folder should hold the four files {file_list()} (each may be gzipped)")
        arrays[key] = read_idx(path, EXPECTED_DIMENSIONS[key])
        paths[key] = path
    check_dataset(arrays, paths)
    return arrays


def cached_content(cache, file_name, expected_md5):
    """The decompressed bytes of a cached copy (NAME.gz or NAME) whose MD5 matches, else None."""
    for path in (cache / (file_name + ".gz"), cache / file_name):
        if not path.is_file():
            continue
        try:
            content = decompress_if_gzip(read_bytes(path), path)
        except DataError:
            continue   # a corrupt cached copy is simply fetched again
        if md5_hex(content) == expected_md5:
            return content
    return None


def download(cache, file_name, expected_md5, mirrors, log):
    """Fetch NAME.gz from the first mirror that serves content with the right MD5; store it in the cache."""
    target = cache / (file_name + ".gz")
    last_reason = "no mirrors given"
    for mirror in mirrors:
        url = mirror_url(mirror, file_name)
        if log:
            log(f"downloading {url}")
        try:
            body = fetch_url(url, DOWNLOAD_TIMEOUT_S)
            content = decompress_if_gzip(body, url)
        except (OSError, http.client.HTTPException, ValueError, DataError) as error:
            last_reason = f"{url}: {one_line(error)}"
            continue
        actual_md5 = md5_hex(content)
        if actual_md5 != expected_md5:
            last_reason = f"{url}: checksum mismatch (md5 {actual_md5}, expected {expected_md5})"
            continue
        stored = body if body.startswith(GZIP_MAGIC) else gzip.compress(content, mtime=0)
        try:
            atomic_write_bytes(target, stored)
        except OSError as error:
            raise DataError(f"{target}: cannot write the downloaded file: {one_line(error)}") from None
        return content
    raise DataError(f"{target}: could not download {file_name}.gz from any of {len(mirrors)} mirror(s) "
                    f"(last: {last_reason}); put the four files {file_list()} (gzipped or not) in {cache} "
                    f"by hand, or pass --data-dir DIR pointing at a folder with the four files")


def load_from_cache(cache_dir, download_missing, mirrors, checksums, log):
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    expected = {**MNIST_MD5, **(checksums or {})}
    mirrors = list(MNIST_MIRRORS if mirrors is None else mirrors)
    if download_missing:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"{cache}: cannot create the MNIST cache folder: {one_line(error)}") from None
    arrays, paths = {}, {}
    for key, file_name in MNIST_FILES.items():
        path = cache / (file_name + ".gz")
        content = cached_content(cache, file_name, expected[file_name])
        if content is None and not download_missing:
            raise DataError(f"{path}: not in the cache (or its checksum does not match) and downloading is off; "
                            f"put the four files {file_list()} in {cache}, "
                            f"or pass --data-dir DIR pointing at a folder with the four files")
        if content is None:
            content = download(cache, file_name, expected[file_name], mirrors, log)
        arrays[key] = parse_idx(content, path, EXPECTED_DIMENSIONS[key])
        paths[key] = path
    check_dataset(arrays, paths)
    return arrays


def print_to_stderr(message):
    print(message, file=sys.stderr, flush=True)


def load_mnist(data_dir=None, *, cache_dir=None, download=True, mirrors=None, checksums=None,
               log=print_to_stderr):
    """The four MNIST arrays: {"train_images": (N, H, W) uint8, "train_labels": (N,) uint8,
    "test_images": (M, H, W) uint8, "test_labels": (M,) uint8}.

    data_dir   a folder holding the four files of MNIST_FILES, each as NAME or NAME.gz. No checksum
               is enforced, so any dataset in MNIST's format works (Fashion-MNIST, synthetic ones).
    cache_dir  used when data_dir is None (default $XDG_CACHE_HOME/scratchvit/mnist or
               ~/.cache/scratchvit/mnist): files whose decompressed MD5 matches are used as they are;
               the others are downloaded (if `download`) from `mirrors` (default MNIST_MIRRORS).
    checksums  file name -> MD5 of the decompressed file, overriding MNIST_MD5 (for tests).
    log        called with a one-line message before each download; None for silence.

    Every problem raises DataError with a one-line message naming the file.
    """
    if data_dir is not None:
        return load_from_folder(data_dir)
    return load_from_cache(cache_dir, download, mirrors, checksums, log)


# ---------------------------------------------------------------------------------------------
# On the device: normalisation and the random-shift augmentation
# ---------------------------------------------------------------------------------------------

def normalize(images_uint8, backend, dtype="float32"):
    """(N, H, W) uint8 pixels -> (N, 1, H, W) device array of (x/255 - MNIST_MEAN) / MNIST_STD in `dtype`.

    The uint8 array is uploaded once (4x less traffic than floats), then converted on the device;
    every step is in-place in `dtype`, so float32 never goes through a float64 temporary.
    """
    if images_uint8.ndim != 3:
        raise ValueError(f"normalize expects images of shape (N, H, W), got shape {images_uint8.shape}")
    backend = get_backend(backend)
    pixels = backend.asarray(images_uint8)              # (N, H, W) uint8 on the device
    count, height, width = pixels.shape
    normalized = pixels.astype(dtype).reshape(count, 1, height, width)
    normalized /= 255
    normalized -= MNIST_MEAN
    normalized /= MNIST_STD
    return normalized


@dispatched(lambda images, shifts, fill=BACKGROUND: images)
def shift_images(images, shifts, fill=BACKGROUND):
    """Translate image b of (B, C, H, W) `images` by the integers shifts[b] = (dy, dx).

        shifted[b, c, y, x] = images[b, c, y - dy, x - dx]   where that pixel exists, else `fill`

    so a positive dy moves the content down and a positive dx moves it right. One gather with
    computed indices for the whole batch: the source row/column of every output pixel is clipped
    into the image, gathered, and the pixels whose source lay outside are replaced by `fill`.
    On the GPU the same, pixel by pixel, runs as one kernel (kernels/shift_images.py).
    """
    xp = get_array_module(images)
    batch, channels, height, width = images.shape
    shifts = xp.asarray(shifts)                          # (B, 2), on the images' device
    shift_rows, shift_cols = shifts[:, 0:1], shifts[:, 1:2]                  # (B, 1) each
    source_rows = xp.arange(height)[None, :] - shift_rows                    # (B, H)
    source_cols = xp.arange(width)[None, :] - shift_cols                     # (B, W)
    row_inside = (source_rows >= 0) & (source_rows < height)
    col_inside = (source_cols >= 0) & (source_cols < width)
    source_rows = xp.clip(source_rows, 0, height - 1)
    source_cols = xp.clip(source_cols, 0, width - 1)

    batch_index = xp.arange(batch)[:, None, None, None]                      # (B, 1, 1, 1)
    channel_index = xp.arange(channels)[None, :, None, None]                 # (1, C, 1, 1)
    gathered = images[batch_index, channel_index,
                      source_rows[:, None, :, None], source_cols[:, None, None, :]]   # (B, C, H, W)
    inside = row_inside[:, None, :, None] & col_inside[:, None, None, :]     # (B, 1, H, W)
    fill_value = xp.asarray(fill, dtype=images.dtype)                        # 0-d: keeps images' dtype
    return xp.where(inside, gathered, fill_value).astype(images.dtype, copy=False)


def random_shift(images, max_shift, generator, fill=BACKGROUND):
    """Translate each image of (B, C, H, W) `images` by its own (dy, dx), uniform in [-max_shift, max_shift].

    `generator` is a NumPy or CuPy Generator (`backend.random_generator(seed)`) on the images'
    device. Pixels shifted in from outside get `fill` (default: a black pixel after `normalize`).
    Returns a new array of the same shape, dtype and device; max_shift=0 returns `images` itself.
    """
    if max_shift == 0:
        return images
    if max_shift < 0 or int(max_shift) != max_shift:
        raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    max_shift = int(max_shift)
    shifts = generator.integers(-max_shift, max_shift + 1, size=(images.shape[0], 2))   # (B, 2): dy, dx
    return shift_images(images, shifts, fill)
