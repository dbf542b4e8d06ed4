"""The Vision Transformer: images in, class logits out.

Shapes (B batch, C channels, image_size S, patch_size p, N = (S/p)^2 patches, T = N + 1 tokens,
D = dim, K = num_classes):

    images (B, C, S, S)
    patches = Patchify(images)                   (B, N, p*p*C)
    tokens  = patches @ W_embed + b_embed        (B, N, D)      the Linear `patch_embed`
    x = [cls_token; tokens] + pos_embedding      (B, T, D)      cls_token (1, 1, D) repeated over the batch,
                                                                pos_embedding (1, T, D) broadcast over it
    x = Dropout(x)                               embedding dropout (emb_dropout)
    x = EncoderBlock(x), depth times             (B, T, D)
    cls = LayerNorm(x[:, 0])                     (B, D)         the final norm, on the CLS token only (LN
                                                                acts per token, so this equals normalising
                                                                every token and then taking the first)
    logits = cls @ W_head + b_head               (B, K)

Backward, in reverse:
    g_cls = norm.backward(head.backward(g_logits))
    g_x = zeros (B, T, D) with g_x[:, 0] = g_cls          only the CLS token reached the head
    g_x = block.backward(g_x), last block first
    g_x = emb_dropout.backward(g_x)
    d pos_embedding = sum over the batch of g_x           it was broadcast over the batch
    d cls_token     = sum over the batch of g_x[:, 0]     it was repeated over the batch
    g_images = patchify.backward(patch_embed.backward(g_x[:, 1:]))

Parameter names (`named_parameters()`, `state_dict()`), for depth blocks numbered from 0:
    cls_token, pos_embedding, patch_embed.{weight,bias},
    blocks.{i}.attn_norm.{weight,bias}, blocks.{i}.attn.qkv.{weight,bias}, blocks.{i}.attn.proj.{weight,bias},
    blocks.{i}.mlp_norm.{weight,bias}, blocks.{i}.fc1.{weight,bias}, blocks.{i}.fc2.{weight,bias},
    norm.{weight,bias}, head.{weight,bias}
`parameter_shapes(**config)` gives each one's shape from the configuration alone, and `check_config`
checks a configuration, its size against MAX_PARAMETERS included, before anything is allocated (ViT calls
it first; checkpoint_file.py checks a checkpoint's arrays against both before reading them).
"""
import numbers

import numpy

from .backend import get_array_module, get_backend, host_generator, to_host
from .encoder_block import EncoderBlock
from .layers import Dropout, LayerNorm, Layer, Linear, Parameter, Patchify
from .layers.layer import check_same_device

# cls_token and pos_embedding start as standard Gaussian noise, as in vit-pytorch (timm uses 0.02): distinct
# position vectors from the start let attention use position at once (the measurement behind the choice:
# README, "How the settings were chosen").
POSITION_INIT_STD = 1.0


# The largest model the package builds: 10^9 parameters are 4 GB of float32 weights, and training keeps four
# arrays of that size (weights, gradients, Adam's two moments). A configuration above it is refused before
# anything is allocated, with what it would need, so a typo (--dim 100000) is one line, not a MemoryError.
MAX_PARAMETERS = 1_000_000_000
TRAINING_COPIES = 4            # weights, gradients, exp_avg, exp_avg_sq: what training holds per parameter


def gibibytes(count):
    """A byte count for a message: `1.5 GiB`."""
    return f"{count / 2**30:,.1f} GiB"


def _positive_int(name, value):
    """`value` as a Python int (NumPy integers too: the configuration goes into JSON), or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_probability(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def parameter_count(*, image_size, patch_size, num_classes, dim, depth, mlp_dim, channels=1, **unused):
    """The number of weights of a ViT of this configuration, from the sizes alone (nothing allocated).

    Per block: two LayerNorms (2D each), qkv (D x 3D + 3D), proj (D x D + D), fc1 (D x M + M), fc2 (M x D + D).
    Around them: cls_token D, pos_embedding (N + 1) D, patch_embed (p p C x D + D), norm 2D, head (D x K + K)."""
    num_patches = (image_size // patch_size) ** 2
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp_dim + mlp_dim) + (mlp_dim * dim + dim)
    return (dim + (num_patches + 1) * dim + patch_size * patch_size * channels * dim + dim + depth * block + 2 * dim
            + dim * num_classes + num_classes)


def parameter_shapes(*, image_size, patch_size, num_classes, dim, depth, mlp_dim, channels=1, **unused):
    """{name: shape} of every weight, in `named_parameters()` order, from the configuration alone: what a
    checkpoint's arrays are checked against before any of them is read (checkpoint_file.py)."""
    num_patches = (image_size // patch_size) ** 2
    shapes = {"cls_token": (1, 1, dim), "pos_embedding": (1, num_patches + 1, dim),
              "patch_embed.weight": (patch_size * patch_size * channels, dim), "patch_embed.bias": (dim,)}
    for i in range(depth):
        for name, shape in (("attn_norm.weight", (dim,)), ("attn_norm.bias", (dim,)),
                            ("attn.qkv.weight", (dim, 3 * dim)), ("attn.qkv.bias", (3 * dim,)),
                            ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
                            ("mlp_norm.weight", (dim,)), ("mlp_norm.bias", (dim,)),
                            ("fc1.weight", (dim, mlp_dim)), ("fc1.bias", (mlp_dim,)),
                            ("fc2.weight", (mlp_dim, dim)), ("fc2.bias", (dim,))):
            shapes[f"blocks.{i}.{name}"] = shape
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (dim, num_classes),
                   "head.bias": (num_classes,)})
    return shapes


def check_config(*, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=1, dropout=0.0,
                 emb_dropout=0.0, dtype="float32"):
    """The configuration as ViT stores it (plain ints and floats), or ValueError naming the first option that
    cannot work: not a positive integer, a patch that does not divide the image, heads that do not divide dim,
    or a model above MAX_PARAMETERS (the message says what it would need). Allocates nothing."""
    sizes = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
                 heads=heads, mlp_dim=mlp_dim, channels=channels)
    config = {name: _positive_int(name, value) for name, value in sizes.items()}
    _check_probability("dropout", dropout)
    _check_probability("emb_dropout", emb_dropout)
    config.update(dropout=dropout, emb_dropout=emb_dropout)
    if config["image_size"] % config["patch_size"]:
        raise ValueError(f"image_size {config['image_size']} must be divisible by patch_size {config['patch_size']}")
    if config["dim"] % config["heads"]:
        raise ValueError(f"dim {config['dim']} must be divisible by heads {config['heads']}")
    dtype = numpy.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point type such as float32 or float64, got {dtype}")
    count = parameter_count(**config)
    if count > MAX_PARAMETERS:
        raise ValueError(f"the model (dim {config['dim']}, depth {config['depth']}, mlp_dim {config['mlp_dim']}, "
                         f"image_size {config['image_size']}, patch_size {config['patch_size']}) would have {count:,} "
                         f"parameters: {gibibytes(count * dtype.itemsize)} of {dtype} weights, at least "
                         f"{gibibytes(TRAINING_COPIES * count * dtype.itemsize)} to train; the limit is "
                         f"{MAX_PARAMETERS:,} parameters")
    return config


class ViT(Layer):
    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=1,
                 dropout=0.0, emb_dropout=0.0, dtype="float32", seed=0):
        # checked first: a configuration too large to build is refused before any weight is allocated
        self.config = check_config(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim,
                                   depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels, dropout=dropout,
                                   emb_dropout=emb_dropout, dtype=dtype)
        image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels = (
            self.config[name] for name in ("image_size", "patch_size", "num_classes", "dim", "depth", "heads",
                                           "mlp_dim", "channels"))
        dtype = numpy.dtype(dtype)
        self.dtype = dtype
        num_patches = (image_size // patch_size) ** 2
        rng = host_generator(seed)   # every weight is drawn on the host, so CPU and GPU start identical
        dropout_seeds = rng.integers(0, 2**31, size=3 * depth + 1).tolist()

        self.cls_token = Parameter((POSITION_INIT_STD * rng.standard_normal((1, 1, dim))).astype(dtype))
        self.pos_embedding = Parameter((POSITION_INIT_STD * rng.standard_normal((1, num_patches + 1, dim))).astype(dtype))
        self.patchify = Patchify(patch_size)
        self.patch_embed = Linear(patch_size * patch_size * channels, dim, dtype=dtype, rng=rng)
        self.emb_dropout = Dropout(emb_dropout, seed=dropout_seeds[-1])
        self.blocks = [EncoderBlock(dim, heads, mlp_dim, dropout=dropout, dtype=dtype, rng=rng,
                                    dropout_seeds=dropout_seeds[3 * i:3 * i + 3]) for i in range(depth)]
        self.norm = LayerNorm(dim, dtype=dtype)
        self.head = Linear(dim, num_classes, dtype=dtype, rng=rng)

    # ----------------------------------------------------------------------------------------------
    def forward(self, images):
        xp = get_array_module(images)
        config = self.config
        expected = (config["channels"], config["image_size"], config["image_size"])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"(channels, image_size, image_size), got {images.shape}")
        check_same_device("ViT", images, self.cls_token)
        if images.dtype != self.dtype:
            images = images.astype(self.dtype)      # a float32 model stays float32, whatever the images are
        B = images.shape[0]
        tokens = self.patch_embed.forward(self.patchify.forward(images))          # (B, N, D)
        N, D = tokens.shape[1], tokens.shape[2]
        x = xp.empty((B, N + 1, D), dtype=tokens.dtype)
        x[:, 0] = self.cls_token.data[0]                                           # CLS token, repeated over the batch
        x[:, 1:] = tokens
        x += self.pos_embedding.data                                               # broadcast over the batch
        x = self.emb_dropout.forward(x)
        for block in self.blocks:
            x = block.forward(x)
        cls = self.norm.forward(x[:, 0])                                           # (B, D)
        return self.head.forward(cls)                                              # (B, K)

    def backward(self, grad_logits):
        xp = get_array_module(self.pos_embedding.data)      # the model's device, whatever grad_logits is
        # forward: logits = head(norm(x[:, 0]))
        grad_cls = self.norm.backward(self.head.backward(grad_logits))            # (B, D)
        B, D = grad_cls.shape
        grad_x = xp.zeros((B, self.pos_embedding.shape[1], D), dtype=grad_cls.dtype)
        grad_x[:, 0] = grad_cls
        # forward: x = block(x), depth times
        for block in reversed(self.blocks):
            grad_x = block.backward(grad_x)
        grad_x = self.emb_dropout.backward(grad_x)
        # forward: x = [cls; tokens] + pos_embedding
        self.pos_embedding.grad += grad_x.sum(axis=0, keepdims=True)
        self.cls_token.grad += grad_x[:, :1].sum(axis=0, keepdims=True)
        # forward: tokens = patch_embed(patchify(images))
        return self.patchify.backward(self.patch_embed.backward(grad_x[:, 1:]))

    # ----------------------------------------------------------------------------------------------
    def dropout_layers(self):
        return [layer for layer in self.layers() if isinstance(layer, Dropout)]

    def fix_dropout_masks(self):
        """Make every dropout layer reuse its mask (for gradient checks with dropout on)."""
        for layer in self.dropout_layers():
            layer.fix_mask()

    def state_dict(self):
        """{name: NumPy copy of the parameter}, in named_parameters() order."""
        return {name: to_host(parameter.data).copy() for name, parameter in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters in place; every name must be present with its exact shape."""
        parameters = dict(self.named_parameters())
        unexpected = sorted(set(state) - set(parameters))
        if unexpected:
            raise KeyError(f"unexpected parameter {unexpected[0]!r} in the state dict "
                           f"(this model has no parameter of that name)")
        for name, parameter in parameters.items():
            if name not in state:
                raise KeyError(f"missing parameter {name!r} in the state dict")
            value = state[name]
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(f"shape mismatch for {name!r}: the state dict has {tuple(value.shape)}, "
                                 f"the model expects {tuple(parameter.shape)}")
        xp = get_backend(self.device).xp
        for name, parameter in parameters.items():
            parameter.data[...] = xp.asarray(state[name], dtype=parameter.data.dtype)
