"""Properties of the random affine augmentation (scratchvit/affine.py), against exact references:
the identity, numpy.rot90, data.shift_images, a per-pixel bilinear reference, and NumPy for CuPy."""
import math

import numpy
import pytest
from hypothesis import given, settings, strategies as st

from scratchvit.affine import affine_sample, inverse_affine_matrices, random_affine
from scratchvit.backend import get_array_module, get_backend, host_generator, to_host
from scratchvit.data import BACKGROUND, shift_images

from conftest import on_gpu


def batch_of(count, value=0.0):
    return numpy.full(count, value)


def matrices(count, angle=0.0, scale=1.0, shear=0.0, translation=(0.0, 0.0)):
    """The sampling maps of `count` images that all take the same transform."""
    return inverse_affine_matrices(batch_of(count, angle), batch_of(count, scale), batch_of(count, shear),
                                   numpy.tile(numpy.asarray(translation, dtype=float), (count, 1)))


def images_of(shape, seed=0, dtype=numpy.float64):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bilinear_reference(image, px, py, fill):
    """One pixel by the textbook formula, with explicit bounds checks (H, W) = image.shape."""
    height, width = image.shape
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0

    def at(row, col):
        return image[row, col] if 0 <= row < height and 0 <= col < width else fill

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


@given(batch=st.integers(1, 4), channels=st.integers(1, 3), height=st.integers(1, 9), width=st.integers(1, 9),
       dtype=st.sampled_from([numpy.float32, numpy.float64]))
@settings(deadline=None)
def test_identity_returns_the_batch_unchanged(batch, channels, height, width, dtype):
    images = images_of((batch, channels, height, width), dtype=dtype)
    before = images.copy()
    sampled = affine_sample(images, matrices(batch))
    assert sampled.dtype == dtype and sampled.shape == images.shape and sampled is not images
    numpy.testing.assert_array_equal(sampled, images)
    numpy.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3, -1])
@pytest.mark.parametrize("size", [6, 7])                       # even and odd: the centre between or on a pixel
def test_quarter_turn_of_a_square_image_equals_rot90(quarter_turns, size):
    images = images_of((3, 2, size, size), seed=1)
    rotated = affine_sample(images, matrices(3, angle=quarter_turns * math.pi / 2))
    numpy.testing.assert_allclose(rotated, numpy.rot90(images, quarter_turns, axes=(2, 3)), rtol=0, atol=1e-12)


@given(shifts=st.lists(st.tuples(st.integers(-8, 8), st.integers(-8, 8)), min_size=1, max_size=5))
@settings(deadline=None)
def test_whole_pixel_translation_equals_shift_images(shifts):
    shifts = numpy.asarray(shifts)                              # (B, 2) as (dy, dx)
    images = images_of((len(shifts), 2, 6, 5), seed=2)          # not square: a swapped x and y would show
    translations = shifts[:, ::-1].astype(float)                 # (tx, ty) = (dx, dy)
    identity = numpy.zeros(len(shifts))
    sampled = affine_sample(images, inverse_affine_matrices(identity, identity + 1, identity, translations), fill=-3.0)
    numpy.testing.assert_array_equal(sampled, shift_images(images, shifts, fill=-3.0))


@given(angle=st.floats(-math.pi, math.pi), scale=st.floats(0.5, 2.0), shear=st.floats(-1.0, 1.0),
       tx=st.floats(-5, 5), ty=st.floats(-5, 5))
@settings(deadline=None, max_examples=30)
def test_every_pixel_matches_the_bilinear_formula_at_the_mapped_point(angle, scale, shear, tx, ty):
    """The batched gather against the formula pixel by pixel, with p = A⁻¹ (q - t) about the centre,
    A = R(angle) Shear(shear) scale computed here by matrix inversion, not by the closed form."""
    image = images_of((5, 6), seed=3)
    height, width = image.shape
    rotate = numpy.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    forward = rotate @ numpy.array([[1.0, -math.tan(shear)], [0.0, 1.0]]) * scale
    inverse = numpy.linalg.inv(forward)
    sampled = affine_sample(image[None, None], matrices(1, angle, scale, shear, (tx, ty)), fill=-2.0)[0, 0]
    centre = numpy.array([(width - 1) / 2, (height - 1) / 2])
    for row in range(height):
        for col in range(width):
            px, py = inverse @ (numpy.array([col, row]) - centre - [tx, ty]) + centre
            assert sampled[row, col] == pytest.approx(bilinear_reference(image, px, py, -2.0), abs=1e-9)


def test_rotation_turns_content_counter_clockwise_as_displayed():
    image = numpy.zeros((1, 1, 5, 5))
    image[0, 0, 0, 2] = 1.0                                   # a dot at the top centre
    turned = affine_sample(image, matrices(1, angle=math.pi / 2), fill=0.0)[0, 0]
    assert turned[2, 0] == pytest.approx(1.0) and abs(turned).sum() == pytest.approx(1.0)   # now at the left


def test_positive_shear_moves_the_top_right_and_the_bottom_left():
    image = numpy.zeros((1, 1, 9, 9))
    image[0, 0, :, 4] = 1.0                                   # a vertical stroke through the centre
    sheared = affine_sample(image, matrices(1, shear=math.atan(0.5)), fill=0.0)[0, 0]
    assert sheared[0, 6] == pytest.approx(1.0) and sheared[8, 2] == pytest.approx(1.0)   # x' = x - y tan(shear)
    assert sheared[4, 4] == pytest.approx(1.0)                # the centre row stays


def test_scale_above_one_enlarges_about_the_centre():
    image = numpy.zeros((1, 1, 9, 9))
    image[0, 0, 4, 6] = 1.0                                   # two pixels right of the centre
    enlarged = affine_sample(image, matrices(1, scale=2.0), fill=0.0)[0, 0]
    assert enlarged[4, 8] == pytest.approx(1.0)               # four pixels right of it
    assert enlarged[4, 4] == 0.0


def test_content_from_outside_is_the_fill_value():
    images = images_of((2, 1, 6, 6), seed=4)
    far = affine_sample(images, matrices(2, translation=(40.0, -3.5)), fill=-9.0)
    assert numpy.all(far == -9.0)


def test_random_affine_with_all_ranges_zero_returns_the_images_and_draws_nothing():
    images = images_of((3, 1, 4, 4), dtype=numpy.float32)
    generator = host_generator(0)
    assert random_affine(images, generator) is images
    assert generator.random() == host_generator(0).random()


def test_random_affine_draws_within_its_ranges_and_keeps_dtype():
    """Each image is one draw from the ranges: recompute the draws and compare with affine_sample."""
    images = images_of((16, 1, 8, 8), seed=5, dtype=numpy.float32)
    before = images.copy()
    augmented = random_affine(images, host_generator(7), rotation=20, scale=0.1, shear=5, translate=0.125)
    uniform = host_generator(7).random((16, 5)) * 2 - 1
    expected = affine_sample(images, inverse_affine_matrices(
        uniform[:, 0] * math.radians(20), 1 + uniform[:, 1] * 0.1, uniform[:, 2] * math.radians(5),
        uniform[:, 3:5] * 0.125 * 8), fill=BACKGROUND)
    assert augmented.dtype == numpy.float32 and augmented.shape == images.shape
    numpy.testing.assert_allclose(augmented, expected, rtol=0, atol=1e-5)
    numpy.testing.assert_array_equal(images, before)
    assert not numpy.allclose(augmented[0], augmented[1])           # each image its own transform


def test_random_affine_scales_the_translation_by_width_along_x_and_height_along_y():
    """On a wide image (H = 4, W = 12) the range is ±translate · W pixels along the columns and
    ±translate · H along the rows: the draws recomputed here give the same images bit for bit, and a
    vertical line moves sideways further than H would allow (a range on swapped axes could not)."""
    height, width = 4, 12
    images = numpy.zeros((32, 1, height, width))
    images[:, :, :, 5] = 1.0                                   # a vertical line: shows the column shift
    augmented = random_affine(images, host_generator(3), translate=0.5, fill=0.0)
    uniform = host_generator(3).random((32, 5)) * 2 - 1
    translations = uniform[:, 3:5] * 0.5 * numpy.array([width, height])       # (tx, ty) pixels
    identity = numpy.zeros(32)
    expected = affine_sample(images, inverse_affine_matrices(identity, identity + 1, identity, translations),
                             fill=0.0)
    numpy.testing.assert_array_equal(augmented, expected)
    # where the line is still whole (0 <= 5 + tx <= 11), its column centre of mass is 5 + tx
    columns = augmented[:, 0].sum(axis=1)                                      # (32, W) per-image column mass
    line_at = columns @ numpy.arange(width) / numpy.maximum(columns.sum(axis=1), 1e-300)
    inside = (translations[:, 0] >= -5) & (translations[:, 0] <= 6)
    numpy.testing.assert_allclose(line_at[inside], 5 + translations[inside, 0], atol=1e-9)
    assert abs(line_at[inside] - 5).max() > height / 2                         # beyond ±translate · H


@pytest.mark.parametrize("option, value", [("rotation", 180), ("scale", 1.0), ("shear", -1), ("translate", 1.5)])
def test_random_affine_rejects_ranges_that_cannot_work(option, value):
    with pytest.raises(ValueError, match=option):
        random_affine(images_of((1, 1, 4, 4)), host_generator(0), **{option: value})


def test_affine_sample_rejects_matrices_of_another_batch():
    with pytest.raises(ValueError, match=r"matrices must have shape \(2, 2, 3\)"):
        affine_sample(images_of((2, 1, 4, 4)), matrices(3))


@on_gpu
def test_on_gpu_matches_numpy():
    """The same images and maps on the device give NumPy's result on the host."""
    backend = get_backend("gpu")
    images = images_of((6, 2, 7, 9), seed=6, dtype=numpy.float32)
    maps = inverse_affine_matrices(numpy.linspace(-1, 1, 6), numpy.linspace(0.8, 1.2, 6), numpy.linspace(-0.3, 0.3, 6),
                                   numpy.linspace(-3, 3, 12).reshape(6, 2))
    expected = affine_sample(images, maps)
    sampled = affine_sample(backend.asarray(images), backend.asarray(maps))
    assert get_array_module(sampled) is backend.xp
    numpy.testing.assert_allclose(to_host(sampled), expected, rtol=0, atol=1e-5)
    drawn = random_affine(backend.asarray(images), backend.random_generator(0), rotation=10, scale=0.1, translate=0.1)
    assert get_array_module(drawn) is backend.xp and drawn.dtype == numpy.float32


@pytest.mark.parametrize("option, value, fragment", [("--rotation", "180", "rotation must be below 180"),
                                                     ("--scale", "1", "scale must be below 1"),
                                                     ("--translate", "-0.1", "translate must be non-negative"),
                                                     ("--ema-decay", "1", "--ema-decay must be in [0, 1)")])
def test_train_mnist_refuses_an_augmentation_or_average_that_cannot_work_in_one_line(tmp_path, option, value, fragment):
    from test_train import assert_one_line_error, cli
    result = cli("--data-dir", tmp_path / "none", "--out-dir", tmp_path / "run", option, value)
    assert_one_line_error(result, 2, fragment)
