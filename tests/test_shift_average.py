"""scratchvit/shift_average.py: class probabilities averaged over an image and its shifts.

Each test is meant to fail for a realistic fault: a sum not divided by the number of shifts, copies of
one image averaged with another's (tile where repeat is meant, or a reshape in the wrong order), a shift
applied to the wrong axis or in the wrong direction, images lost or repeated at a batch boundary,
dropout left on, the model's mode not restored, and bad arguments that fail deep inside or not at all.

The oracle moves the images by padding and slicing (not data.shift_images) and takes the textbook
softmax in float64 of one forward pass per shift. The shifts it uses are not symmetric: the nine of the
square average the same whichever way a shift is read, so they could not show a swapped axis or sign.
"""
import numpy
import pytest

from conftest import on_gpu
from scratchvit import ViT
from scratchvit.backend import to_host
from scratchvit.data import BACKGROUND
from scratchvit.shift_average import NO_SHIFT, ONE_PIXEL_SHIFTS, shift_averaged_probabilities

LOPSIDED = ((0, 0), (1, 0), (0, -1), (-1, 1))      # down, left, up and right: no axis or sign is averaged away
CONFIG = dict(image_size=12, patch_size=4, num_classes=5, dim=16, depth=1, heads=2, mlp_dim=32, channels=1)


def tiny_model(dtype="float64", **overrides):
    """A random ViT whose probabilities are far from uniform (its head scaled up), so shifts change them."""
    model = ViT(**{**CONFIG, **overrides}, dtype=dtype, seed=3)
    model.head.weight.data *= 40
    return model


def images(count=7, seed=0):
    """(count, 1, 12, 12) float64: a bright block on noise, somewhere different in each image."""
    rng = numpy.random.default_rng(seed)
    batch = 0.3 * rng.standard_normal((count, 1, 12, 12))
    for image in batch:
        top, left = rng.integers(1, 7, size=2)
        image[0, top:top + 4, left:left + 4] += 2.5
    return batch


def moved(batch, dy, dx):
    """batch[b, c, y - dy, x - dx] where that pixel exists, else the background (the oracle's shift)."""
    height, width = batch.shape[2:]
    padded = numpy.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=BACKGROUND)
    return padded[:, :, 1 - dy:1 - dy + height, 1 - dx:1 - dx + width]


def softmax_rows(logits):
    exps = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return exps / exps.sum(axis=1, keepdims=True)


def by_hand(model, batch, shifts):
    with model.evaluating():
        return numpy.mean([softmax_rows(to_host(model.forward(moved(batch, dy, dx)))) for dy, dx in shifts], axis=0)


def test_the_one_pixel_shifts_are_the_image_and_its_eight_neighbours():
    assert len(ONE_PIXEL_SHIFTS) == 9 == len(set(ONE_PIXEL_SHIFTS))
    assert set(ONE_PIXEL_SHIFTS) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert NO_SHIFT == ((0, 0),)


@pytest.mark.parametrize("batch_size", [500, 10, 3, 1])
def test_the_average_is_the_mean_of_the_softmax_over_the_moved_images(batch_size):
    """500: one pass; 10: two images (eight copies) a pass over seven images, the last pass one image;
    3 and 1: fewer copies a pass than shifts, so one image a pass."""
    model, batch = tiny_model(), images()
    expected = by_hand(model, batch, LOPSIDED)
    result = shift_averaged_probabilities(model, batch, LOPSIDED, batch_size=batch_size)
    assert isinstance(result, numpy.ndarray) and result.shape == (7, 5) and result.dtype == numpy.float64
    numpy.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-12)


def test_the_nine_shifts_and_no_shift():
    model, batch = tiny_model(), images()
    numpy.testing.assert_allclose(shift_averaged_probabilities(model, batch), by_hand(model, batch, ONE_PIXEL_SHIFTS),
                                  rtol=1e-12, atol=1e-14)
    plain = shift_averaged_probabilities(model, batch, NO_SHIFT)
    numpy.testing.assert_allclose(plain, by_hand(model, batch, NO_SHIFT), rtol=1e-12, atol=1e-14)
    # the shifts are real moves: the average is not the image alone, nor is any one image's row another's
    assert numpy.abs(shift_averaged_probabilities(model, batch) - plain).max() > 1e-3
    assert numpy.abs(by_hand(model, batch, LOPSIDED) - by_hand(model, batch, ((0, 0), (-1, 0), (0, 1), (1, -1)))).max() > 1e-3


def test_dropout_is_off_and_the_models_mode_comes_back():
    model, batch = tiny_model(dropout=0.5), images()
    model.train()
    first = shift_averaged_probabilities(model, batch, LOPSIDED)
    assert model.training
    numpy.testing.assert_allclose(first, by_hand(model, batch, LOPSIDED), rtol=1e-12, atol=1e-14)
    model.eval()
    shift_averaged_probabilities(model, batch, LOPSIDED)
    assert not model.training


def test_a_float32_model_gives_float32_probabilities_of_the_float64_average():
    model32, model64, batch = tiny_model("float32"), tiny_model(), images()
    result = shift_averaged_probabilities(model32, batch.astype(numpy.float32), LOPSIDED)
    assert result.dtype == numpy.float32
    numpy.testing.assert_allclose(result, by_hand(model64, batch, LOPSIDED), atol=2e-5)


@pytest.mark.parametrize("shifts", [(), ((0.5, 0),), ((0, 0, 0),), "ab", 3, ((0, None),)])
def test_shifts_that_are_not_integer_pairs_are_refused_naming_the_argument(shifts):
    with pytest.raises(ValueError, match=r"^shifts must be a non-empty sequence of \(dy, dx\) integer pairs"):
        shift_averaged_probabilities(tiny_model(), images(2), shifts)


def test_integer_pairs_of_any_integer_type_are_accepted():
    model, batch = tiny_model(), images(2)
    given = [numpy.array([1, 0]), (numpy.int64(0), -1)]
    numpy.testing.assert_allclose(shift_averaged_probabilities(model, batch, given),
                                  by_hand(model, batch, ((1, 0), (0, -1))), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True, None])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(batch_size):
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer"):
        shift_averaged_probabilities(tiny_model(), images(2), batch_size=batch_size)


@pytest.mark.parametrize("shape", [(0, 1, 12, 12), (2, 12, 12)])
def test_images_that_are_not_a_batch_of_images_are_refused(shape):
    with pytest.raises(ValueError, match=r"^images must be \(B, C, H, W\) with at least one image"):
        shift_averaged_probabilities(tiny_model(), numpy.zeros(shape))


@on_gpu
def test_on_the_gpu_the_average_is_the_hosts():
    import cupy
    model, batch = tiny_model(), images()
    on_host = by_hand(model, batch, ONE_PIXEL_SHIFTS)
    model.to("gpu")
    on_device = shift_averaged_probabilities(model, cupy.asarray(batch))
    assert isinstance(on_device, cupy.ndarray)
    numpy.testing.assert_allclose(cupy.asnumpy(on_device), on_host, rtol=1e-10, atol=1e-12)
