"""A user's digit image made into an MNIST image: the steps LeCun, Cortes and Burges used to make MNIST.

MNIST was made from NIST's black-and-white scans: each digit was scaled, keeping its aspect ratio, so
that its longer side fits a 20x20 box (anti-aliasing turned the binary strokes into grey levels), then
placed in a 28x28 field so that its centre of mass lies at the centre. A model trained on MNIST has
only ever seen digits made that way; a photo or a drawing must be made the same way before it sees it.

The steps of `mnist_style`, for (H, W) grey levels 0..255:

    1. background  b = median of the border pixels          the outermost rows and columns: a digit
                                                            rarely covers most of them, while a bold
                                                            digit may cover most of a tight crop
    2. light?      b > (min + max) / 2                      paper, a white canvas: dark ink on light
    3. ink         i = b - x if light else x - b            how far each pixel is from the background,
                                                            toward the ink; MNIST's own images (ink
                                                            bright on 0) keep their values exactly
    4. noise floor i = max(i - 6 sigma, 0)                  sigma = 1.4826 * median |border - b|, the
                                                            border's robust standard deviation: a
                                                            photo's grain falls below 6 sigma; 0 for a
                                                            clean image
       blank       max(i) < 32 grey levels                  nothing stands out: BlankImage, never NaN
    5. extent      bounding box of i >= 0.05 * max(i)       relative to the image's own ink, so faint
                                                            specks and smudges do not count as digit
    6. fit         crop the extent and 2 pixels (of the     shrinking: each pixel the mean of what it
                   result) around it; resize so the         covers (Pillow's BOX), the anti-aliasing of
                   extent's longer side is 20               a binary scan; enlarging: bilinear
    7. full ink    scale so the brightest pixel is 255      MNIST's strokes reach 254 or 255 in every
                   (only if it is below 254), round to      test image; a pencil line, or a thin stroke
                   whole grey levels                        thinned further by step 6, would not
    8. centre      paste into 28x28 at the offset that      MNIST's way: the mass, not the bounding
                   puts the centre of mass on pixel 14      box, is centred; a lopsided digit is moved
                                                            only as far as keeps its extent whole

Measured on MNIST's 10,000 test images: every centre of mass lies in [13.5, 14.5) in both coordinates
(one exactly at 13.5; of the 60,000 training images a few lie up to 0.02 below), so MNIST's "centre"
is pixel 14 counted from 0, not the geometric 13.5, and step 8 aims there; the bounding box of the
non-zero pixels has a longer side of 20 in 9,997 of them (19 in three). Written to PNG and read back,
9,997 of the 10,000 come out of `mnist_style` unchanged, pixel for pixel (the three others are those
19 pixels tall, enlarged to 20); tests/test_preprocess.py holds the same for digits it draws itself.

`to_model_input` then normalises exactly as training does: training feeds `data.normalize` the uint8
pixels, so the prepared images are rounded to uint8 and go through that same function.

Pillow is an optional extra (`pip install "scratchvit[image]"`): it reads the files and resamples.
"""
import importlib.util
import warnings

import numpy

from .backend import to_host
from .data import normalize, one_line

PILLOW_HINT = 'reading images needs Pillow: pip install "scratchvit[image]" (or pip install Pillow)'

CANVAS_SIZE = 28           # MNIST's field
BOX_SIZE = 20              # the box the digit's longer side is scaled to
CENTRE = 14.0              # where MNIST's centres of mass lie (row and column, counted from 0): see above
NOISE_MULTIPLE = 6.0       # ink must stand this many standard deviations of the border's noise above it
MIN_INK_CONTRAST = 32.0    # grey levels (of 255): less than an eighth of the range is not ink, it is a blank page
INK_FRACTION = 0.05        # of the strongest ink: the threshold of the digit's extent (see step 5)
FRINGE = 2                 # pixels of the 20x20 scale kept around that extent: the strokes' anti-aliased edge
FULL_INK = 254.0           # MNIST's strokes reach 254 or 255: fainter ink is stretched to 255
ROBUST_SIGMA = 1.4826      # median absolute deviation -> standard deviation, for Gaussian noise


class ImageError(ValueError):
    """A file that is not an image or cannot be read; the message is one line naming the file."""


class BlankImage(ImageError):
    """An image with no ink: nothing stands out from the background."""


# ------------------------------------------------------------------------------------------------
# Pillow, and reading files

def pillow_available():
    return importlib.util.find_spec("PIL") is not None


def require_pillow():
    """PIL.Image, or ImportError with the one-line PILLOW_HINT."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(PILLOW_HINT) from None
    return Image


def load_grayscale(path):
    """The grey levels of an image file, (H, W) uint8; ImageError naming the file if it cannot be read.

    Anything Pillow reads (PNG, JPEG, GIF's first frame, BMP, TIFF, WebP, ...). A phone photo's EXIF
    orientation is applied, so the digit is upright as the phone showed it. Colour becomes luminance
    (ITU-R 601, Pillow's "L"); 16-bit grey is scaled down to 8 bits.

    Transparency: a drawing exported from a canvas is usually strokes on a transparent background, the
    ink in the alpha channel, and its colour in the RGB of transparent pixels arbitrary (often black,
    like the strokes). So the image is composited over a backdrop of the opposite of its opaque pixels:
    white behind dark strokes, black behind light ones. Either way the strokes stand out as ink; a
    white backdrop under white strokes would make the drawing blank.
    """
    Image = require_pillow()
    from PIL import ImageOps
    try:
        # Pillow warns about images over 89 million pixels (a decompression bomb?): one line, not a warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (Pillow does not recognise its format)") from None
    except Exception as error:   # Pillow's decoders raise many types on damaged files (OSError, SyntaxError, ...)
        raise ImageError(f"{path}: damaged or unreadable image ({type(error).__name__}: {one_line(error)})") from None
    return grey_levels(image)


def grey_levels(image):
    """(H, W) uint8 luminance of a Pillow image, transparency composited as load_grayscale says."""
    if image.mode.startswith("I;16"):
        return numpy.rint(numpy.asarray(image, dtype=numpy.float64) / 257).astype(numpy.uint8)   # 65535 -> 255
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if not has_alpha:
        return numpy.asarray(image.convert("L"), dtype=numpy.uint8)
    luminance_alpha = numpy.asarray(image.convert("RGBA").convert("LA"), dtype=numpy.float64)   # (H, W, 2)
    luminance, opacity = luminance_alpha[..., 0], luminance_alpha[..., 1] / 255
    if opacity.min() == 1.0:
        return luminance.astype(numpy.uint8)
    opaque_weight = opacity.sum()
    opaque_mean = (luminance * opacity).sum() / opaque_weight if opaque_weight > 0 else 0.0
    backdrop = 255.0 if opaque_mean < 128 else 0.0
    composited = luminance * opacity + backdrop * (1 - opacity)
    return numpy.rint(composited).astype(numpy.uint8)


# ------------------------------------------------------------------------------------------------
# MNIST's steps

def validated_grey_levels(pixels):
    """`pixels` as a float64 (H, W) host array of grey levels 0..255, or ValueError naming the argument."""
    pixels = to_host(pixels)
    if pixels.dtype == bool:
        pixels = pixels.astype(numpy.uint8) * 255          # True is ink-bright, as on MNIST
    if pixels.dtype.kind not in "iuf":
        raise ValueError(f"pixels must be a numeric array of grey levels 0..255, got dtype {pixels.dtype}")
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"pixels must be a non-empty 2-D (H, W) array of grey levels, got shape {pixels.shape}")
    grey = pixels.astype(numpy.float64)
    if not numpy.isfinite(grey).all():
        raise ValueError("pixels must be finite grey levels 0..255, got NaN or infinity")
    lowest, highest = grey.min(), grey.max()
    if lowest < 0 or highest > 255:
        raise ValueError(f"pixels must be grey levels in 0..255, got values from {lowest:g} to {highest:g}")
    if pixels.dtype.kind == "f" and 0 < highest <= 1:
        # a 0..1 float image would pass the range check and come out nearly blank, its ink below 1 grey level
        raise ValueError(f"pixels must be grey levels 0..255, got floats in 0..{highest:g} "
                         f"(a 0..1 image? multiply it by 255)")
    return grey


def border_pixels(grey):
    """The outermost rows and columns of (H, W) `grey`, as one 1-D array."""
    return numpy.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])


def ink_strength(grey):
    """(H, W) ink strength >= 0: how far each pixel is from the background toward the ink, above the
    border's noise (steps 1 to 4); BlankImage when nothing reaches MIN_INK_CONTRAST."""
    border = border_pixels(grey)
    background = numpy.median(border)
    light_background = background > (grey.min() + grey.max()) / 2
    ink = background - grey if light_background else grey - background
    noise = ROBUST_SIGMA * numpy.median(numpy.abs(border - background))
    ink = numpy.maximum(ink - NOISE_MULTIPLE * noise, 0.0)
    strongest = ink.max()
    if strongest < MIN_INK_CONTRAST:
        raise BlankImage(f"blank image: no ink stands out from the background (the strongest differs from it by "
                         f"{strongest:.0f} grey levels beyond the noise; ink needs {MIN_INK_CONTRAST:.0f})")
    return ink


def ink_extent(ink):
    """(top, bottom, left, right), ends exclusive: the bounding box of the pixels with at least
    INK_FRACTION of the strongest ink (step 5)."""
    strong = ink >= INK_FRACTION * ink.max()
    rows, columns = numpy.flatnonzero(strong.any(axis=1)), numpy.flatnonzero(strong.any(axis=0))
    return rows[0], rows[-1] + 1, columns[0], columns[-1] + 1


def fit_in_box(ink, box_size=BOX_SIZE, fringe=FRINGE):
    """The ink scaled so the longer side of its extent is box_size, keeping the aspect ratio (step 6).

    The crop is the extent widened by `fringe` pixels of the result on every side (none when enlarging
    more than `fringe` times), with background beyond the image's edges, so where the digit lies does
    not matter: the anti-aliased edge of a stroke lies partly below the extent's threshold, and cutting
    it would change an MNIST image that needs no scaling.

    Shrinking, each result pixel is the mean of the source pixels it covers (Pillow's BOX filter): the
    area coverage by which anti-aliasing turns a binary scan into grey levels, without the ringing of
    Lanczos (whose lobes put 6% of a stroke's strength a pixel beyond its edge). Measured on MNIST's
    10,000 test images drawn 7 times larger, dark on light and off-centre, then prepared: BOX comes
    closest to the originals (mean difference 6.8 grey levels; Lanczos 7.5, bilinear 7.9) and the
    trained model of runs/gpu-recipe-a classifies them as well as with the others (99.21%; 99.26%,
    99.18%; the originals 99.18%). Enlarging a small drawing, bilinear, which does not show its pixels
    as blocks. At scale 1 the result is an exact copy.
    Result: (h, w) float64, box_size + 2 * fringe on the longer side at most.
    """
    Image = require_pillow()
    top, bottom, left, right = ink_extent(ink)
    scale = box_size / max(bottom - top, right - left)
    margin = int(fringe / scale)                                   # source pixels: at most `fringe` result pixels
    top, bottom, left, right = top - margin, bottom + margin, left - margin, right + margin
    height, width = ink.shape
    inside = ink[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    crop = numpy.pad(inside, ((max(-top, 0), max(bottom - height, 0)), (max(-left, 0), max(right - width, 0))))
    crop = crop.astype(numpy.float32)                              # background beyond the image's edges
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))   # Pillow's (width, height)
    resampling = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    fitted = Image.fromarray(crop).resize(size, resampling)                                # mode "F"
    return numpy.asarray(fitted, dtype=numpy.float64)


def full_ink(fitted):
    """Stretch so the brightest pixel is 255 when it is below FULL_INK, then whole grey levels 0..255 (step 7)."""
    brightest = fitted.max()
    if brightest <= 0:
        raise BlankImage("blank image: no ink left after scaling it into the 20x20 box")
    if brightest < FULL_INK:
        fitted = fitted * (255.0 / brightest)
    return numpy.rint(numpy.clip(fitted, 0.0, 255.0))


def centre_of_mass(image):
    """(row, column) of the intensity-weighted mean position of (h, w) `image`, pixels counted from 0."""
    total = image.sum()
    rows = image.sum(axis=1) @ numpy.arange(image.shape[0]) / total
    columns = image.sum(axis=0) @ numpy.arange(image.shape[1]) / total
    return rows, columns


def place_by_centre_of_mass(digit, canvas_size=CANVAS_SIZE, centre=CENTRE):
    """(canvas_size, canvas_size) with (h, w) `digit` pasted so its centre of mass lands on pixel `centre`
    (step 8): the offset is the rounded difference, a tie rounded so the mass lands at centre - 0.5 (where
    MNIST's one tie lies). A lopsided digit whose mass lies far from its middle would be pushed partly
    off the canvas: the offset is then clamped so its extent (ink_extent) stays whole; only the faint
    fringe beyond the extent may be cut."""
    height, width = digit.shape
    row_mass, column_mass = centre_of_mass(digit)
    ink_top, ink_bottom, ink_left, ink_right = ink_extent(digit)
    top = min(max(int(numpy.ceil(centre - 0.5 - row_mass)), -ink_top), canvas_size - ink_bottom)
    left = min(max(int(numpy.ceil(centre - 0.5 - column_mass)), -ink_left), canvas_size - ink_right)
    # paste digit[y, x] at canvas[top + y, left + x], keeping what falls inside the canvas
    canvas = numpy.zeros((canvas_size, canvas_size), dtype=numpy.float32)
    first_row, first_column = max(-top, 0), max(-left, 0)
    last_row, last_column = min(height, canvas_size - top), min(width, canvas_size - left)
    canvas[top + first_row:top + last_row, left + first_column:left + last_column] = \
        digit[first_row:last_row, first_column:last_column]
    return canvas


def mnist_style(pixels):
    """(H, W) grey levels 0..255 (any numeric dtype; dark-on-light or light-on-dark) -> (28, 28) float32
    image as MNIST's: ink bright on 0, whole grey levels 0..255, before normalisation.

    ValueError naming `pixels` for an array that is not grey levels; BlankImage when there is no ink.
    """
    ink = ink_strength(validated_grey_levels(pixels))
    digit = full_ink(fit_in_box(ink))
    return place_by_centre_of_mass(digit)


def load_mnist_style(path):
    """mnist_style(load_grayscale(path)), with a blank image's one-line message naming the file."""
    pixels = load_grayscale(path)
    try:
        return mnist_style(pixels)
    except BlankImage as error:
        raise BlankImage(f"{path}: {error}") from None


def to_model_input(prepared_images):
    """(28, 28) or (B, 28, 28) images from mnist_style (or MNIST's own uint8) -> (B, 1, 28, 28) float32
    host array, normalised as training normalises: rounded to uint8, then `data.normalize`."""
    images = to_host(prepared_images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.dtype.kind not in "iuf":
        raise ValueError(f"prepared_images must be (H, W) or (B, H, W) grey levels 0..255, "
                         f"got shape {images.shape} of dtype {images.dtype}")
    pixels = numpy.rint(images)
    if pixels.size and not (numpy.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(f"prepared_images must be grey levels in 0..255, got values from {pixels.min():g} "
                         f"to {pixels.max():g}")
    return normalize(pixels.astype(numpy.uint8), "cpu")
