"""scratchvit.preprocess: a user's image made into an MNIST image, as MNIST itself was made.

The digits here are drawn in the test: strokes along polylines in a 20x20 box, each pixel's grey level
the fraction of it the stroke covers (anti-aliased, as MNIST's), pasted into 28x28 where the centre of
mass falls in [13.5, 14.5), where every MNIST test image has it. Such an image is in MNIST's format,
so preprocessing must give it back unchanged; drawn larger, elsewhere or dark on light, the same digit
must come out (nearly) the same. tests/test_predict.py uses these digits to train a tiny model.

Each test is meant to fail for a realistic bug: no inversion or an inversion decided by the wrong
pixels, a crop that counts faint noise or cuts the strokes' anti-aliased edge, an aspect ratio lost,
the centre of mass at the wrong place, a blank image turned into NaN, an error with a traceback.
"""
import functools
import importlib.util
import io
import sys

import numpy
import pytest
from hypothesis import given, strategies as st

from scratchvit.data import normalize
from scratchvit.preprocess import (CANVAS_SIZE, CENTRE, FULL_INK, MIN_INK_CONTRAST, PILLOW_HINT, BlankImage,
                                   ImageError, load_grayscale, load_mnist_style, mnist_style, to_model_input)

HAS_PILLOW = importlib.util.find_spec("PIL") is not None
pytestmark = pytest.mark.skipif(not HAS_PILLOW, reason='Pillow is not installed (pip install Pillow, or the '
                                                       '"image" extra): preprocessing reads and resamples with it')
if HAS_PILLOW:
    from PIL import Image, ImageDraw

BOX = 20
SUBSAMPLES = 8          # per pixel and axis, for the stroke coverage: faint edges from 4 grey levels, as MNIST's


# ------------------------------------------------------------------------------------------------
# synthetic digits in MNIST's format

def ring():
    angles = numpy.linspace(0, 2 * numpy.pi, 25)
    return [list(zip(10 + 9.3 * numpy.cos(angles), 10 + 6.0 * numpy.sin(angles)))]


# Polylines of (row, column) points in the 20x20 box, continuous coordinates 0..20, rows down. Every shape
# reaches the top and the bottom of the box with a full stroke, so its ink spans exactly 20 rows, as the
# longer side of MNIST's digits does.
SHAPES = {
    0: ring(),                                                   # an oval "0"
    1: [[(-1.0, 10.5), (21.0, 9.5)]],                              # a "1"
    2: [[(1.2, 4.0), (1.2, 16.0), (21.0, 8.0)]],                   # a "7"
    3: [[(-1.0, 5.0), (18.6, 5.0), (18.6, 16.0)]],                 # an "L"
}
CLASSES = len(SHAPES)


def render_box(polylines, half_width=1.5):
    """(20, 20) uint8, ink 255 on 0: the fraction of each pixel within half_width of a stroke, counted on
    SUBSAMPLES x SUBSAMPLES points per pixel. Each segment is measured only over the points near it."""
    samples = BOX * SUBSAMPLES
    positions = (numpy.arange(samples) + 0.5) / SUBSAMPLES                 # sample coordinates, rows = columns
    inside = numpy.zeros((samples, samples), dtype=bool)
    for polyline in polylines:
        for start, end in zip(polyline[:-1], polyline[1:]):
            start, end = numpy.asarray(start, dtype=float), numpy.asarray(end, dtype=float)
            low = numpy.clip(numpy.floor((numpy.minimum(start, end) - half_width) * SUBSAMPLES).astype(int), 0, samples)
            high = numpy.clip(numpy.ceil((numpy.maximum(start, end) + half_width) * SUBSAMPLES).astype(int), 0, samples)
            rows, columns = numpy.meshgrid(positions[low[0]:high[0]], positions[low[1]:high[1]], indexing="ij")
            offsets = numpy.stack([rows - start[0], columns - start[1]], axis=-1)          # (r, c, 2)
            direction = end - start
            along = numpy.clip(offsets @ direction / (direction @ direction), 0, 1)        # nearest point's t
            distance = numpy.linalg.norm(offsets - along[..., None] * direction, axis=-1)
            inside[low[0]:high[0], low[1]:high[1]] |= distance <= half_width
    coverage = inside.reshape(BOX, SUBSAMPLES, BOX, SUBSAMPLES).mean(axis=(1, 3))
    return numpy.rint(255 * coverage).astype(numpy.uint8)


def centre_of_mass(image):
    """(row, column) of the intensity-weighted mean pixel position, counted from 0 (written out here)."""
    image = numpy.asarray(image, dtype=numpy.float64)
    rows, columns = numpy.indices(image.shape)
    return (image * rows).sum() / image.sum(), (image * columns).sum() / image.sum()


def mnist_format(box):
    """(28, 28) uint8 with the (20, 20) box pasted so its centre of mass lies in [13.5, 14.5), as in every
    MNIST test image (the box kept whole where that is impossible)."""
    row_mass, column_mass = centre_of_mass(box)
    top, left = int(numpy.ceil(13.5 - row_mass)), int(numpy.ceil(13.5 - column_mass))
    top, left = min(max(top, 0), 28 - BOX), min(max(left, 0), 28 - BOX)
    image = numpy.zeros((28, 28), dtype=numpy.uint8)
    image[top:top + BOX, left:left + BOX] = box
    return image


def digit(label, rng=None):
    """An MNIST-format digit of class `label`: the plain shape, or with rng its corners moved by up to a
    pixel and a stroke width drawn at random."""
    if rng is None:
        return mnist_format(render_box(SHAPES[label]))
    polylines = [[(row + rng.uniform(-1, 1), column + rng.uniform(-1, 1)) for row, column in polyline]
                 for polyline in SHAPES[label]]
    return mnist_format(render_box(polylines, half_width=rng.uniform(1.2, 2.0)))


def extent(image, fraction=0.05):
    """(height, width) of the bounding box of the pixels with at least `fraction` of the brightest."""
    rows, columns = numpy.nonzero(image >= fraction * image.max())
    return rows.max() - rows.min() + 1, columns.max() - columns.min() + 1


def difference_within_a_pixel(prepared, image):
    """The mean absolute difference of two 28x28 images, at the best of the 9 shifts by up to a pixel:
    MNIST's placement rounds the centre of mass to a whole pixel, so two drawings of one digit whose
    centres of mass lie at 13.5 and at 14.49 are both placed as MNIST places them, a pixel apart."""
    return min(numpy.abs(numpy.roll(prepared, (dy, dx), axis=(0, 1)) - image).mean()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def enlarged(image, size):
    """(size, size) uint8: the image scaled up with Pillow's bicubic filter, as a larger drawing of it."""
    return numpy.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def on_canvas(image, shape, top, left, background=0):
    canvas = numpy.full(shape, background, dtype=numpy.uint8)
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas


def write_png(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


@functools.lru_cache(maxsize=None)
def all_digits():
    """28 digits: the four shapes, then 24 drawn with jitter, the class of digit i being i % 4."""
    rng = numpy.random.default_rng(0)
    return [digit(label) for label in range(CLASSES)] + [digit(label % CLASSES, rng) for label in range(24)]


# ------------------------------------------------------------------------------------------------
# 1. an MNIST image comes out unchanged

def test_the_synthetic_digits_are_in_mnists_format():
    """What the other tests assume about the digits they draw, checked independently of preprocess."""
    for image in all_digits():
        assert image.dtype == numpy.uint8 and image.shape == (28, 28)
        assert max(extent(image, fraction=1e-9)) == BOX                    # every non-zero pixel inside 20x20
        assert image.max() == 255
    for label in range(CLASSES):
        row_mass, column_mass = centre_of_mass(digit(label))
        assert 13.5 <= row_mass < 14.5 and 13.5 <= column_mass < 14.5


def test_an_mnist_format_image_comes_out_unchanged():
    for image in all_digits():
        prepared = mnist_style(image)
        assert prepared.dtype == numpy.float32 and prepared.shape == (CANVAS_SIZE, CANVAS_SIZE)
        numpy.testing.assert_array_equal(prepared, image)


@pytest.mark.parametrize("brightest", [254, 253])
def test_ink_that_reaches_254_is_kept_and_fainter_ink_is_stretched_to_255(brightest):
    """FULL_INK: MNIST's strokes reach 254 or 255, so an MNIST image whose brightest pixel is 254 comes
    out unchanged; at 253 the ink is stretched so the brightest is 255 (step 7)."""
    for image in all_digits()[:4]:
        fainter = numpy.rint(image * (brightest / 255)).astype(numpy.uint8)
        assert fainter.max() == brightest
        prepared = mnist_style(fainter)
        if brightest >= FULL_INK:
            numpy.testing.assert_array_equal(prepared, fainter)
        else:
            numpy.testing.assert_array_equal(prepared, numpy.rint(fainter * (255 / brightest)))
            assert prepared.max() == 255


def test_a_png_of_an_mnist_format_image_comes_out_unchanged(tmp_path):
    for index, image in enumerate(all_digits()[:6]):
        path = write_png(tmp_path / f"digit{index}.png", image)
        numpy.testing.assert_array_equal(load_grayscale(path), image)
        numpy.testing.assert_array_equal(load_mnist_style(path), image)


def test_to_model_input_normalises_exactly_as_training():
    images = numpy.stack(all_digits()[:5])                                # (5, 28, 28) uint8
    expected = normalize(images, "cpu")                                   # what training feeds the model
    for prepared in (images.astype(numpy.float32), images + 0.3, images - 0.3, images):
        model_input = to_model_input(prepared)
        assert model_input.dtype == numpy.float32 and model_input.shape == (5, 1, 28, 28)
        numpy.testing.assert_array_equal(model_input, expected)          # rounded to uint8 first, as training's
    numpy.testing.assert_array_equal(to_model_input(images[0]), expected[:1])     # one (28, 28) image


@pytest.mark.parametrize("bad", [numpy.full((2, 28, 28), 256.0), numpy.full((2, 28, 28), -1.0),
                                 numpy.full((2, 28, 28), numpy.nan), numpy.zeros((2, 2, 28, 28))])
def test_to_model_input_rejects_what_is_not_grey_levels(bad):
    with pytest.raises(ValueError) as error:
        to_model_input(bad)
    assert_one_line(error, "prepared_images")


# ------------------------------------------------------------------------------------------------
# 2. the same digit drawn otherwise comes out the same

def test_a_light_background_is_inverted():
    for image in all_digits()[:8]:
        numpy.testing.assert_array_equal(mnist_style(255 - image), image)    # black on white: exactly
        # grey pencil (40) on grey paper (230): the ink is stretched back to full strength
        on_paper = numpy.rint(230 - image * (190 / 255)).astype(numpy.uint8)
        assert numpy.abs(mnist_style(on_paper) - image).max() <= 1


def test_light_or_dark_is_decided_by_the_background_not_by_how_much_ink_there_is():
    """A bold digit that covers most of a tight crop: more ink than paper, still dark ink on paper."""
    bold = numpy.full((40, 40), 255, dtype=numpy.uint8)
    bold[3:37, 4:36] = 0                                 # ink over 68% of the pixels
    bold[12:28, 14:26] = 255                             # a "0" with a small hole
    prepared = mnist_style(bold)
    reference = mnist_style(255 - bold)
    numpy.testing.assert_array_equal(prepared, reference)
    assert prepared[14, 14] == 0                         # the hole is background, the ring ink
    assert prepared.mean() > 60


def test_where_the_digit_lies_on_a_larger_canvas_does_not_matter():
    for image in all_digits()[:4]:
        big = enlarged(image, 120)
        outputs = [mnist_style(on_canvas(big, (300, 260), top, left)) for top, left in [(0, 0), (90, 7), (180, 140)]]
        for output in outputs[1:]:
            numpy.testing.assert_array_equal(output, outputs[0])


@pytest.mark.parametrize("size", [56, 200, 333])
def test_a_larger_drawing_of_the_digit_comes_out_close_to_it(size):
    digits = all_digits()[:8]                              # two of each class
    for index, image in enumerate(digits):
        prepared = mnist_style(enlarged(image, size))
        assert max(extent(prepared)) in (BOX, BOX + 1, BOX + 2)            # the enlarged edges are blurred
        row_mass, column_mass = centre_of_mass(prepared)
        assert abs(row_mass - CENTRE) <= 0.5 and abs(column_mass - CENTRE) <= 0.5
        # grey levels move by resampling up and down (by 3 to 12 on average), the digit stays: it is
        # closer to where it came from than to any digit of another class (those differ by 13 to 47)
        difference = difference_within_a_pixel(prepared, image)
        assert difference < 12, difference
        assert all(difference < difference_within_a_pixel(prepared, other)
                   for other_index, other in enumerate(digits) if other_index % CLASSES != index % CLASSES)


def test_a_small_drawing_is_enlarged_to_the_box():
    small = numpy.zeros((9, 7), dtype=numpy.uint8)
    small[1:8, 3] = 255                                   # a 7-pixel "1"
    small[1, 2] = 255
    prepared = mnist_style(small)
    assert max(extent(prepared)) in (BOX, BOX + 1)
    assert numpy.isfinite(prepared).all()


@pytest.mark.parametrize("height, width, expected", [(40, 200, (4, 20)), (200, 40, (20, 4)), (90, 60, (20, 13))])
def test_the_aspect_ratio_is_kept(height, width, expected):
    block = numpy.full((height, width), 255, dtype=numpy.uint8)
    prepared = mnist_style(on_canvas(block, (300, 300), 50, 30))
    got = extent(prepared, fraction=0.5)
    assert abs(got[0] - expected[0]) <= 1 and abs(got[1] - expected[1]) <= 1, got


def test_the_centre_of_mass_lands_on_mnists_centre_even_for_a_lopsided_digit():
    """A "7" drawn with a heavy top bar: its box is not centred, its mass is (MNIST's way)."""
    seven = numpy.zeros((100, 70), dtype=numpy.uint8)
    seven[0:12, :] = 255                                  # the heavy bar
    for row in range(12, 100):
        column = 64 - (row - 12) * 40 // 88
        seven[row, column - 5:column + 5] = 255
    prepared = mnist_style(seven)
    row_mass, column_mass = centre_of_mass(prepared)
    assert abs(row_mass - CENTRE) <= 0.5 and abs(column_mass - CENTRE) <= 0.5
    rows = numpy.nonzero(prepared.max(axis=1) > 0)[0]
    assert (rows.min() + rows.max()) / 2 >= 16            # its box lies low: centring the box would be 13.5


@st.composite
def drawings(draw):
    """A dark- or light-background image with a polyline drawn by Pillow (binary strokes, like NIST's scans)."""
    height, width = draw(st.integers(30, 240)), draw(st.integers(30, 240))
    points = draw(st.lists(st.tuples(st.floats(0.15, 0.85), st.floats(0.15, 0.85)), min_size=2, max_size=5)
                  .filter(lambda points: numpy.ptp(numpy.array(points), axis=0).max() > 0.1))     # not a dot
    background = draw(st.integers(0, 255))
    ink = draw(st.integers(0, 255).filter(lambda value: abs(value - background) >= 100))
    image = Image.new("L", (width, height), background)
    stroke = max(2, min(height, width) // draw(st.integers(6, 14)))
    ImageDraw.Draw(image).line([(x * width, y * height) for y, x in points], fill=ink, width=stroke, joint="curve")
    return numpy.asarray(image).copy()


@given(drawings())
def test_every_drawing_comes_out_as_an_mnist_digit(pixels):
    before = pixels.copy()
    prepared = mnist_style(pixels)
    numpy.testing.assert_array_equal(pixels, before)                          # the input is not modified
    assert prepared.dtype == numpy.float32 and prepared.shape == (28, 28)
    assert numpy.array_equal(prepared, numpy.rint(prepared)) and prepared.min() >= 0
    assert prepared.max() >= 254                                              # full-strength ink, as MNIST's
    # the longer side fits 20x20: 20 pixels, give or take the partly covered pixels at the ends (shrinking)
    # and the blur of the edges (enlarging)
    assert BOX - 1 <= max(extent(prepared)) <= BOX + 2
    row_mass, column_mass = centre_of_mass(prepared)
    ink_rows, ink_columns = numpy.nonzero(prepared >= 0.05 * prepared.max())
    # mass on MNIST's centre, unless that would push the digit off the canvas: then it touches that edge
    assert abs(row_mass - CENTRE) <= 0.5 or ink_rows.min() == 0 or ink_rows.max() == 27
    assert abs(column_mass - CENTRE) <= 0.5 or ink_columns.min() == 0 or ink_columns.max() == 27


# ------------------------------------------------------------------------------------------------
# 3. noise, blank images

@pytest.mark.parametrize("pixels", [numpy.zeros((28, 28), numpy.uint8), numpy.full((100, 60), 255, numpy.uint8),
                                    numpy.full((5, 5), 128.0), numpy.zeros((1, 1), numpy.int64)],
                         ids=["black", "white", "grey-float", "one-pixel"])
def test_a_blank_image_is_blank(pixels):
    with pytest.raises(BlankImage) as error:
        mnist_style(pixels)
    assert_one_line(error, "blank")


def noise(shape, centre, sigma, seed=0):
    values = numpy.random.default_rng(seed).normal(centre, sigma, size=shape)
    return numpy.clip(numpy.rint(values), 0, 255).astype(numpy.uint8)


@pytest.mark.parametrize("pixels", [noise((200, 200), 128, 12), noise((300, 400), 230, 25, seed=1),
                                    numpy.random.default_rng(2).integers(0, 25, size=(64, 64)),
                                    on_canvas(numpy.full((20, 5), 20, numpy.uint8), (60, 60), 20, 30)],
                         ids=["grey-noise", "strong-noise-on-paper", "faint-uniform-noise", "too-faint-stroke"])
def test_a_noisy_or_faint_image_without_ink_is_blank(pixels):
    with pytest.raises(BlankImage) as error:
        mnist_style(pixels)
    assert_one_line(error, "blank")


def test_a_digit_on_a_noisy_background_comes_out_close_to_the_clean_one():
    image = digit(2)
    big = enlarged(image, 140).astype(numpy.float64)
    photo = numpy.clip(noise((200, 200), 200, 8).astype(numpy.float64)
                       - on_canvas(big.astype(numpy.uint8), (200, 200), 30, 40) * (150 / 255), 0, 255)
    clean = mnist_style(on_canvas(255 - big.astype(numpy.uint8), (200, 200), 30, 40, background=255))
    prepared = mnist_style(photo.astype(numpy.uint8))
    assert abs(numpy.subtract(centre_of_mass(prepared), centre_of_mass(clean))).max() <= 0.5
    assert abs(numpy.subtract(extent(prepared), extent(clean))).max() <= 1
    assert numpy.abs(prepared - clean).mean() < 8


@pytest.mark.parametrize("strength", [31, 32])
def test_a_stroke_of_exactly_the_minimum_contrast_is_ink_and_one_level_less_is_blank(strength):
    """MIN_INK_CONTRAST (32 grey levels) is the accepted boundary: a clean stroke that strong becomes a
    full-strength digit, one grey level fainter is a blank page."""
    stroke = on_canvas(numpy.full((20, 5), strength, numpy.uint8), (60, 60), 20, 30)
    if strength < MIN_INK_CONTRAST:
        with pytest.raises(BlankImage) as error:
            mnist_style(stroke)
        assert_one_line(error, "blank", "needs 32")
    else:
        prepared = mnist_style(stroke)
        assert extent(prepared) == (BOX, 5) and prepared.max() == 255


def test_faint_specks_do_not_count_as_ink_but_a_real_mark_does():
    image = on_canvas(enlarged(digit(1), 100), (240, 240), 20, 20)
    clean = mnist_style(image)
    speckled = image.copy()
    speckled[220:223, 225:228] = 8                      # 3% of the strongest ink, far from the digit
    numpy.testing.assert_array_equal(mnist_style(speckled), clean)
    marked = image.copy()
    marked[220:223, 225:228] = 200                      # a mark as dark as the pen: part of the drawing
    assert not numpy.array_equal(mnist_style(marked), clean)


# ------------------------------------------------------------------------------------------------
# 4. what mnist_style accepts

@pytest.mark.parametrize("pixels, fragment", [
    (numpy.zeros((28, 28, 3)), "2-D"),
    (numpy.zeros((0, 5)), "2-D"),
    (numpy.full((28, 28), 300), "0..255"),
    (numpy.full((28, 28), -2.0), "0..255"),
    (numpy.full((28, 28), numpy.nan), "finite"),
    (numpy.linspace(0, 0.9, 28 * 28).reshape(28, 28), "0..1"),
    (numpy.array([["a", "b"], ["c", "d"]]), "numeric"),
], ids=["colour", "empty", "above-255", "negative", "nan", "zero-to-one", "strings"])
def test_pixels_that_are_not_grey_levels_are_a_one_line_error_naming_the_argument(pixels, fragment):
    with pytest.raises(ValueError) as error:
        mnist_style(pixels)
    assert not isinstance(error.value, ImageError)
    assert_one_line(error, "pixels", fragment)


def test_float_pixels_up_to_exactly_one_are_refused_as_a_0_to_1_image_and_above_one_are_grey_levels():
    """The 0..1 check's boundary: a float image whose brightest pixel is 1.0 is a 0..1 image (its ink
    would be under one grey level); one reaching 1.5 is read as grey levels, here too faint: blank."""
    image = digit(0).astype(numpy.float64)
    with pytest.raises(ValueError) as error:
        mnist_style(image / 255)                                         # brightest exactly 1.0
    assert not isinstance(error.value, ImageError)
    assert_one_line(error, "pixels", "0..1", "multiply it by 255")
    with pytest.raises(BlankImage):
        mnist_style(image * (1.5 / 255))                                 # grey levels 0..1.5: no ink, not a 0..1 image
    numpy.testing.assert_array_equal(mnist_style(image), digit(0))        # 0..255 floats: the digit itself


def test_any_numeric_dtype_gives_the_same_digit():
    image = digit(0)
    for pixels in (image.astype(numpy.float64), image.astype(numpy.int64), image.astype(numpy.uint16), image > 128):
        prepared = mnist_style(pixels)
        if pixels.dtype == bool:
            assert max(extent(prepared)) == BOX
        else:
            numpy.testing.assert_array_equal(prepared, image)


# ------------------------------------------------------------------------------------------------
# 5. files

def test_colour_becomes_luminance(tmp_path):
    colours = numpy.zeros((4, 4, 3), dtype=numpy.uint8)
    colours[0, 0] = (255, 0, 0)
    colours[1, 1] = (0, 255, 0)
    colours[2, 2] = (255, 255, 255)
    grey = load_grayscale(write_png(tmp_path / "colour.png", colours))
    assert grey.dtype == numpy.uint8 and grey.shape == (4, 4)
    assert (grey[0, 0], grey[1, 1], grey[2, 2], grey[3, 3]) == (76, 150, 255, 0)      # ITU-R 601 luma


@pytest.mark.parametrize("stroke", [(0, 0, 0), (255, 255, 255), (30, 60, 200)], ids=["black", "white", "blue"])
def test_strokes_on_a_transparent_canvas_are_the_ink(tmp_path, stroke):
    """A canvas export: transparent (0, 0, 0, 0) background, the drawing in the opaque pixels."""
    image = digit(2)
    rgba = numpy.zeros((28, 28, 4), dtype=numpy.uint8)
    rgba[..., :3] = stroke
    rgba[..., 3] = image                                # anti-aliased edges are partly transparent
    prepared = load_mnist_style(write_png(tmp_path / "canvas.png", rgba))
    if stroke == (255, 255, 255) or stroke == (0, 0, 0):
        numpy.testing.assert_array_equal(prepared, image)
    else:
        assert numpy.abs(prepared - image).max() <= 2


def test_an_opaque_rgba_image_is_read_by_its_colour(tmp_path):
    rgba = numpy.full((28, 28, 4), 255, dtype=numpy.uint8)
    rgba[..., :3] = (255 - digit(3))[..., None]
    numpy.testing.assert_array_equal(load_mnist_style(write_png(tmp_path / "opaque.png", rgba)), digit(3))


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    pixels = numpy.array([[0, 257, 32896, 65535]], dtype=numpy.uint16)
    numpy.testing.assert_array_equal(load_grayscale(write_png(tmp_path / "deep.png", pixels)), [[0, 1, 128, 255]])


def test_a_jpeg_photo_is_read_upright(tmp_path):
    tall = numpy.zeros((60, 30), dtype=numpy.uint8)
    tall[5:55, 14:17] = 255
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                    # EXIF orientation: "rotate 90 degrees to view"
    Image.fromarray(tall).save(path, quality=95, exif=exif)
    grey = load_grayscale(path)
    assert grey.shape == (30, 60)                       # as a phone shows it
    assert extent(mnist_style(grey), fraction=0.5)[1] == BOX


def test_a_jpeg_of_a_digit_comes_out_close_to_it(tmp_path):
    image = digit(0)
    path = tmp_path / "digit.jpg"
    Image.fromarray(255 - enlarged(image, 150)).save(path, quality=75)
    prepared = load_mnist_style(path)
    assert difference_within_a_pixel(prepared, image) < 10


def test_files_that_are_not_images_are_one_line_errors_naming_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n" * 10)
    buffer = io.BytesIO()
    Image.fromarray(digit(1)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    cases = [(text, "not an image"), (tmp_path / "missing.png", "no such file"), (tmp_path, "folder"),
             (truncated, "damaged")]
    for path, fragment in cases:
        with pytest.raises(ImageError) as error:
            load_grayscale(path)
        assert_one_line(error, str(path), fragment)


def test_a_blank_file_is_blank_naming_the_file(tmp_path):
    path = write_png(tmp_path / "white.png", numpy.full((50, 50), 255, numpy.uint8))
    with pytest.raises(BlankImage) as error:
        load_mnist_style(path)
    assert_one_line(error, str(path), "blank")


def test_without_pillow_the_error_names_the_extra(monkeypatch, tmp_path):
    path = write_png(tmp_path / "digit.png", digit(1))
    monkeypatch.setitem(sys.modules, "PIL", None)         # what `import PIL` meets where Pillow is not installed
    for call in (lambda: load_grayscale(path), lambda: mnist_style(digit(1))):
        with pytest.raises(ImportError) as error:
            call()
        assert_one_line(error, 'pip install "scratchvit[image]"')
        assert str(error.value) == PILLOW_HINT
