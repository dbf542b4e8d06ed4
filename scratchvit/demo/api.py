"""What the page asks and what it is told: a drawing in, the model's view of it out, without HTTP.

`Demo.predict(pixels, layer)` is the whole API; the server (server.py) only moves JSON in and out.

Request (POST /api/predict, JSON):
    {"pixels": [[...], ...], "layer": L}
    pixels  H x W grayscale values 0..255 (the canvas, 280 x 280 on the page), MIN_SIDE <= H, W <= MAX_SIDE;
            dark ink on a light background or light ink on a dark one: the MNIST-style preprocessing
            (scratchvit/preprocess.py) inverts a light background, crops to the ink and centres it
    layer   optional, 0 <= L < number of layers (default: the last): whose per-head maps to return

Answer (200, JSON), with grid = image_size / patch_size (7 for the MNIST models):
    {"blank": false,
     "probabilities": [10 floats summing to 1], averaged over the drawing and its eight one-pixel
                      shifts as predict answers (shift_average.py), or of the drawing alone with
                      Demo(model, shift_average=False),
     "prediction": the most probable class,
     "input": 28 x 28 ints 0..255, the preprocessed drawing the model sees (ink bright, as in MNIST),
     "rollout": grid x grid, the attention rollout over the patches (attention_maps.py), of the drawing,
     "heads": H x grid x grid, the CLS token's attention over the patches in each head of `layer`, of the drawing,
     "layer": L, "num_layers": ..., "num_heads": ..., "grid": ..., "classes": ["0", ..., "9"]}
A drawing with no ink (an empty canvas, after Clear) is an ordinary state of the page, not a mistake
in the request, so it is answered 200 with {"blank": true, "message": "...", ...the model's sizes}
and no numbers that could be NaN.

A bad request raises RequestError, whose message is one line and whose `status` is the HTTP status
the server answers with (400 for a malformed or out-of-range request, 503 when the model has not
answered within the wait).
"""
import concurrent.futures
import queue
import threading

import numpy

from ..attention_maps import inspect
from ..backend import is_gpu_array
from ..predict import model_backend, probabilities
from ..preprocess import BlankImage, mnist_style, to_model_input

MIN_SIDE = 8            # a drawing smaller than this cannot hold a readable digit
MAX_SIDE = 1024         # the page sends 280 x 280; this leaves room for a high-resolution canvas
DECIMALS = 6            # maps and probabilities are rounded: the page draws them, it does not compute with them
INFERENCE_WAIT_S = 30   # how long a request waits for the model thread before it is answered 503
CLOSE_WAIT_S = 2        # how long close() waits for the model thread to finish the drawing in hand


class RequestError(ValueError):
    """A request the API cannot answer; `status` is the HTTP status to answer it with."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def parse_pixels(pixels):
    """The `pixels` field -> (H, W) uint8 array, or RequestError saying what is wrong with it."""
    if not isinstance(pixels, list) or not pixels or not all(isinstance(row, list) for row in pixels):
        raise RequestError('"pixels" must be a list of rows, each a list of grayscale values 0..255')
    width = len(pixels[0])
    if any(len(row) != width for row in pixels):
        raise RequestError('"pixels" rows must all have the same length')
    height = len(pixels)
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise RequestError(f'"pixels" must be between {MIN_SIDE} and {MAX_SIDE} pixels on each side, '
                           f"got {height} x {width}")
    # checked value by value before NumPy sees them: numpy.array would turn a string into a text
    # array, true into 1 and an integer too large for int64 into an object array
    for row in pixels:
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f'"pixels" values must be numbers 0..255, got {value!r}')
    array = numpy.array(pixels, dtype=numpy.float64)
    # not (0 <= x <= 255) rather than (x < 0) | (x > 255): JSON's 1e999 parses as infinity
    if not numpy.all((array >= 0) & (array <= 255)):
        bad = array[~((array >= 0) & (array <= 255))][0]
        raise RequestError(f'"pixels" values must be between 0 and 255, got {bad!r}')
    return numpy.rint(array).astype(numpy.uint8)


def parse_layer(layer, num_layers):
    """The `layer` field -> int in [0, num_layers), the last layer when absent (None)."""
    if layer is None:
        return num_layers - 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise RequestError(f'"layer" must be an integer from 0 to {num_layers - 1}, got {layer!r}')
    return layer


def parse_request(body, num_layers):
    """A decoded JSON request body -> ((H, W) uint8 pixels, layer), or RequestError."""
    if not isinstance(body, dict):
        raise RequestError('the request must be a JSON object {"pixels": [[...]], "layer": L}')
    unknown = sorted(set(body) - {"pixels", "layer"})
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the request takes \"pixels\" and \"layer\"")
    if "pixels" not in body:
        raise RequestError('the request needs "pixels": a list of rows of grayscale values 0..255')
    return parse_pixels(body["pixels"]), parse_layer(body.get("layer"), num_layers)


def _rounded(array):
    return numpy.round(numpy.asarray(array, dtype=numpy.float64), DECIMALS).tolist()


class ModelBusy(RuntimeError):
    """The model thread has not finished a piece of work within the wait."""


class ModelThread:
    """One long-lived thread that runs every piece of work handed to it, one at a time, in order.

    Two reasons to keep the model on one thread. Every layer keeps what its backward pass needs
    from the last forward (attention_maps.inspect reads each block's `attn.attn` from there), so
    two forward passes at once would mix one drawing's attention with another's. And CuPy keeps
    its cuBLAS handles (and the thread's current device) per thread (cupy/cuda/device.pyx,
    Device._get_handle, lines 233-248: a dict in a threading.local), so a forward pass on a fresh
    thread per request would make a new handle for every request.

    The thread is a daemon: a forward pass in progress never keeps the process alive after Ctrl-C."""

    def __init__(self, name="scratchvit-demo-model"):
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, function, timeout_s):
        """function() on the model thread; its result, or its exception raised here. ModelBusy when
        it has not finished within timeout_s (it is then dropped if it has not started)."""
        future = concurrent.futures.Future()
        self._jobs.put((function, future))
        done, _ = concurrent.futures.wait([future], timeout=timeout_s)
        if not done:
            future.cancel()
            raise ModelBusy(f"the model did not answer within {timeout_s:g} s (busy with other drawings); try again")
        return future.result()

    def close(self, timeout_s=CLOSE_WAIT_S):
        """Stop the thread after the work already handed to it, waiting at most timeout_s for it."""
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)

    def _serve(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, future = job
            if not future.set_running_or_notify_cancel():       # its request stopped waiting
                continue
            try:
                result = function()
            except BaseException as error:                    # handed to the waiting request, which decides
                future.set_exception(error)
            else:
                future.set_result(result)


class Demo:
    """A trained model on its own thread (ModelThread), answering drawings.

    Preprocessing and JSON work stay on the caller's thread; only the forward passes and what they
    touch on the device (the upload of the drawing, the copy of the answer back) go to the model
    thread. `wait_s` bounds how long a request waits for it (RequestError 503 after that). One Demo
    per model: two Demos would run the same model on two threads. `shift_average`: the probabilities
    averaged over the drawing's shifts (the default, as predict answers), or of the drawing alone."""

    def __init__(self, model, *, shift_average=True, wait_s=INFERENCE_WAIT_S):
        self.model = model
        self.shift_average = shift_average
        self.wait_s = wait_s
        config = model.config
        self.num_layers = config["depth"]
        self.num_heads = config["heads"]
        self.grid = config["image_size"] // config["patch_size"]
        self.classes = [str(k) for k in range(config["num_classes"])]
        self.model_thread = ModelThread()
        # One drawing through everything now, so that what is missing (Pillow, which the
        # preprocessing imports only when it resamples) stops the start with its ImportError
        # instead of failing every request, and the first drawing answers as fast as the rest.
        warm_up = numpy.full((MIN_SIDE, MIN_SIDE), 255, dtype=numpy.uint8)
        warm_up[2:6, 3:5] = 0
        try:
            self.predict(warm_up)
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop the model thread (bounded wait: CLOSE_WAIT_S)."""
        self.model_thread.close()

    def info(self):
        """The model's sizes, for the page to lay itself out before the first drawing."""
        return dict(num_layers=self.num_layers, num_heads=self.num_heads, grid=self.grid, classes=self.classes)

    def _inspect(self, prepared):
        """On the model thread: (28, 28) preprocessed drawing -> attention_maps.inspect's host arrays, the
        probabilities averaged over the drawing's shifts where the Demo does (the maps stay the drawing's)."""
        weights = self.model.cls_token.data
        if is_gpu_array(weights):
            weights.device.use()      # the CUDA device is current per thread: the weights' one, on this thread
        images = to_model_input(prepared[None])                                           # (1, 1, 28, 28)
        images = model_backend(self.model).asarray(images)                                # onto the model's device
        seen = inspect(self.model, images)
        if self.shift_average:
            seen["probabilities"] = probabilities(self.model, images)                    # (1, K), 9 images in one pass
        return seen

    def predict(self, pixels, layer=None):
        """(H, W) grayscale 0..255 (a drawing) -> the answer dict of the module docstring."""
        layer = parse_layer(layer, self.num_layers)
        try:
            prepared = mnist_style(numpy.asarray(pixels))                                 # (28, 28) 0..255
        except BlankImage as error:
            return dict(self.info(), blank=True, message=str(error) or "the drawing is blank", layer=layer)
        try:
            seen = self.model_thread.run(lambda: self._inspect(prepared), self.wait_s)
        except ModelBusy as error:
            raise RequestError(str(error), 503) from None
        probabilities = seen["probabilities"][0]
        return dict(self.info(), blank=False,
                    probabilities=_rounded(probabilities),
                    prediction=int(numpy.argmax(probabilities)),
                    input=numpy.clip(numpy.rint(prepared), 0, 255).astype(int).tolist(),
                    rollout=_rounded(seen["rollout"][0]),
                    heads=_rounded(seen["heads"][0, layer]),
                    layer=layer)

    def answer(self, body):
        """A decoded JSON request body -> the answer dict, or RequestError."""
        pixels, layer = parse_request(body, self.num_layers)
        return self.predict(pixels, layer)
