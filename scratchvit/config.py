"""The options of a training run (TrainConfig), their validation (ConfigError), and what they build: the model
and the data set on the device.

A TrainConfig is what `train_mnist.py` parses and `train.run` takes; recipes (recipes.py) fill it in. Options
are checked in three places, each as early as it can be: `validate` for what an option alone can tell (before
any file is touched), `validate_for_training_set` and `validate_for_images` once the data are read, and
`build_model` for the model options, before any weight is allocated.
"""
import dataclasses
import math
import numbers
import os

from .data import NUM_CLASSES, DataError, load_mnist, normalize
from .distributed import usable_cores
from .recipes import recipe_for_device, recipe_options
from .vit import TRAINING_COPIES, ViT, check_config, gibibytes, parameter_count

LOSS_READ_INTERVAL = 25        # steps between reads of the loss from the device


@dataclasses.dataclass
class TrainConfig:
    device: str = "cpu"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    patch_size: int = 7
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    label_smoothing: float = 0.0
    clip_grad_norm: float = 1.0
    max_shift: int = 2
    rotation: float = 0.0        # random affine augmentation (affine.py): degrees, ±
    scale: float = 0.0           # scale in [1 - scale, 1 + scale]
    shear: float = 0.0           # degrees, ±
    translate: float = 0.0       # a fraction of the image size, ±, in each direction
    ema_decay: float = 0.998     # evaluate an exponential moving average of the weights (0: off)
    data_dir: str = None
    out_dir: str = "runs/mnist"
    train_limit: int = None
    validation: int = 0          # hold out the last N training images and evaluate them every epoch (0: off)
    eval_batch_size: int = 500
    threads: int = None          # CPU worker threads for the data-parallel step (None: one per core)
    resume: bool = False
    overwrite: bool = False      # replace the run in out_dir (without it a folder holding a run is refused)
    plot: bool = False
    log_every: int = LOSS_READ_INTERVAL   # steps between lines of OUT/steps.jsonl: a multiple of it, or 0 (off)

    @classmethod
    def from_recipe(cls, recipe=None, **options):
        """A TrainConfig with recipe `recipe`'s options (recipes.py; None: the recipe of options' device)
        and then `options`, which win over the recipe. ConfigError for an unknown recipe."""
        if recipe is None:
            recipe = recipe_for_device(options.get("device", cls.device))
        try:
            preset = recipe_options(recipe)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(**dict(preset, **options))

    def validate(self):
        """ConfigError naming the first option that cannot work (model options are checked by build_model)."""
        # inf and NaN pass comparisons such as `lr > 0` (or fail them with a misleading message): refused first
        for name in ("weight_decay", "warmup_epochs", "label_smoothing", "clip_grad_norm", "rotation", "scale",
                     "shear", "translate", "ema_decay", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        positive = ("epochs", "batch_size", "eval_batch_size")
        non_negative = ("weight_decay", "warmup_epochs", "clip_grad_norm", "max_shift", "rotation", "scale", "shear",
                        "translate")
        for name in positive:
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                              "overwrite replaces it")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads!r}")
        # more threads than cores only adds replicas' memory and switching: capped at what the process may use
        if self.threads is not None and self.threads > len(usable_cores()):
            raise ConfigError(f"threads must be at most {len(usable_cores())}, the CPU cores this process may use, "
                              f"got {self.threads!r}")
        if self.validation < 0:
            raise ConfigError(f"validation must be a non-negative number of images (0 turns it off), "
                              f"got {self.validation!r}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"train_limit must be a positive number of images, got {self.train_limit!r}")
        for name, upper in (("rotation", 180), ("scale", 1), ("shear", 90), ("translate", 1)):
            if not getattr(self, name) < upper:
                raise ConfigError(f"{name} must be below {upper}, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns the weight average off), got {self.ema_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        # the step log is written when the loop reads the loss anyway; any other step would make a GPU step wait
        if self.log_every < 0 or self.log_every % LOSS_READ_INTERVAL:
            raise ConfigError(f"log_every must be a multiple of {LOSS_READ_INTERVAL} (the loss is read from the "
                              f"device every {LOSS_READ_INTERVAL} steps), or 0 to turn the step log off, "
                              f"got {self.log_every!r}")

    def validate_for_training_set(self, count):
        """ConfigError if `validation` holds out so many of the `count` training images that none is left."""
        if self.validation >= count:
            raise ConfigError(f"validation must leave at least one training image: at most {count - 1} of the "
                              f"{count} training images, got {self.validation}")

    def validate_for_images(self, image_size):
        """ConfigError for an option that cannot work on images of image_size x image_size pixels."""
        # a shift of s pixels keeps image_size - s rows (columns) of the image: at s >= image_size
        # some images become blank, and a model trained on them learns nothing
        if self.max_shift >= image_size:
            raise ConfigError(f"max_shift must be smaller than the image size {image_size}, got {self.max_shift}")

    def model_config(self, image_size, channels=1, num_classes=10):
        return dict(image_size=image_size, patch_size=self.patch_size, num_classes=num_classes, dim=self.dim,
                    depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim, channels=channels,
                    dropout=self.dropout, emb_dropout=0.0)


class ConfigError(ValueError):
    """An option that cannot work: a bad value, a model that does not fit the data, a missing extra."""


def check_plot_dependency(config):
    """ConfigError before any work when config.plot asks for plots and matplotlib is missing."""
    if config.plot:
        from .plots import MATPLOTLIB_HINT, matplotlib_available
        if not matplotlib_available():
            raise ConfigError(f"--plot: {MATPLOTLIB_HINT}")


def physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def build_model(config, data, *, training=True):
    """The ViT for `config` and the data's image size and classes; ConfigError if the options do not fit,
    before any weight is allocated: a configuration vit.check_config refuses (above vit.MAX_PARAMETERS,
    among others), or one whose weights (training: with their gradients and Adam's two moments) exceed
    this machine's memory on the CPU."""
    model_config = config.model_config(data["image_size"], num_classes=data["num_classes"])
    try:
        check_config(**model_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    count, memory = parameter_count(**model_config), physical_memory()
    needed = count * 4 * (TRAINING_COPIES if training else 1)          # float32
    if config.device == "cpu" and memory is not None and needed > memory:
        raise ConfigError(f"the model (dim {config.dim}, depth {config.depth}, mlp_dim {config.mlp_dim}) has "
                          f"{count:,} parameters and needs at least {gibibytes(needed)} "
                          f"{'to train' if training else 'for its weights'}, more than this machine's "
                          f"{gibibytes(memory)} of memory")
    return ViT(**model_config, seed=config.seed)


def load_data(config, backend):
    """The training and test sets on the device, normalised, and with config.validation = N > 0 the
    validation set: the last N images of the training file, never augmented. They are split off
    first, and config.train_limit then takes the first images of the rest, so the validation images
    stay the same whatever the limit."""
    arrays = load_mnist(config.data_dir)
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    config.validate_for_training_set(train_images.shape[0])
    kept = train_images.shape[0] - config.validation
    validation_images, validation_labels = train_images[kept:], train_labels[kept:]
    train_images, train_labels = train_images[:kept], train_labels[:kept]
    if config.train_limit is not None:
        train_images, train_labels = train_images[:config.train_limit], train_labels[:config.train_limit]
    height, width = train_images.shape[1:]
    if height != width:
        raise DataError(f"images are {height}x{width}: this ViT needs square images")
    data = dict(train_images=normalize(train_images, backend), train_labels=backend.asarray(train_labels, dtype="int64"),
                test_images=normalize(arrays["test_images"], backend),
                test_labels=backend.asarray(arrays["test_labels"], dtype="int64"),
                image_size=height, num_classes=NUM_CLASSES)     # load_mnist checked the labels
    if config.validation > 0:
        data.update(validation_images=normalize(validation_images, backend),
                    validation_labels=backend.asarray(validation_labels, dtype="int64"))
    return data
