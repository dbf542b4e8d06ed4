"""The ViT as a whole: shapes, configuration checks, batching, parameter names, state dicts,
seeds and dtypes, moving between devices, Parameter semantics, and a short training smoke test."""
import re

import numpy
import pytest

import scratchvit.vit
from scratchvit.backend import get_array_module, to_host
from scratchvit.layers import Parameter, SoftmaxCrossEntropy
from scratchvit.optim import AdamW
from scratchvit.vit import ViT

TINY = dict(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16, channels=2)

SIZE_ARGUMENTS = ["image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "channels"]


def make_model(backend, dtype="float64", seed=0, **overrides):
    return ViT(**{**TINY, **overrides}, dtype=dtype, seed=seed).to(backend.name)


def random_images(backend, batch, dtype="float64", seed=1, config=TINY):
    shape = (batch, config["channels"], config["image_size"], config["image_size"])
    return backend.asarray(numpy.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def random_upstream(backend, batch, dtype="float64", seed=2):
    return backend.asarray(numpy.random.default_rng(seed).standard_normal((batch, TINY["num_classes"])), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_and_every_parameter_gets_a_gradient(backend, batch):
    model = make_model(backend)
    images = random_images(backend, batch)
    logits = model.forward(images)
    assert get_array_module(logits) is backend.xp
    assert logits.shape == (batch, TINY["num_classes"])
    grad_images = model.backward(random_upstream(backend, batch))
    assert get_array_module(grad_images) is backend.xp
    assert grad_images.shape == (batch, TINY["channels"], TINY["image_size"], TINY["image_size"])
    assert numpy.any(to_host(grad_images) != 0)
    for name, parameter in model.named_parameters():
        grad = to_host(parameter.grad)
        assert grad.shape == parameter.shape, name
        assert numpy.all(numpy.isfinite(grad)), name
        assert numpy.any(grad != 0), f"{name} got no gradient"


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------

def test_image_size_not_divisible_by_patch_size_raises():
    with pytest.raises(ValueError) as error:
        ViT(**{**TINY, "image_size": 10, "patch_size": 4})
    message = str(error.value)
    assert "image_size" in message and "patch_size" in message
    assert re.search(r"\b10\b", message) and re.search(r"\b4\b", message)


def test_dim_not_divisible_by_heads_raises():
    with pytest.raises(ValueError) as error:
        ViT(**{**TINY, "dim": 10, "heads": 3})
    message = str(error.value)
    assert re.search(r"\bdim\b", message) and "heads" in message
    assert re.search(r"\b10\b", message) and re.search(r"\b3\b", message)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("name", SIZE_ARGUMENTS)
def test_non_positive_size_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ViT(**{**TINY, name: value})


@pytest.mark.parametrize("value", [2.0, True, "8"])
@pytest.mark.parametrize("name", ["image_size", "depth"])
def test_non_integer_size_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ViT(**{**TINY, name: value})


def test_numpy_integer_sizes_are_accepted_as_ints():
    model = ViT(**{**TINY, "image_size": numpy.int64(TINY["image_size"]), "depth": numpy.int32(TINY["depth"])})
    assert model.config["image_size"] == TINY["image_size"] and type(model.config["image_size"]) is int
    assert type(model.config["depth"]) is int and len(model.blocks) == TINY["depth"]


@pytest.mark.parametrize("patch_size, grid", [(4, 1), (1, 4)])
def test_the_accepted_boundaries_of_the_sizes(backend, patch_size, grid):
    """Every size at its smallest accepted value (1: one class, one block, a head of dimension 1, an
    MLP of width 1), a patch as large as the image (one patch) or of one pixel: a forward and backward
    with the shapes of a grid x grid patch layout, every parameter getting a finite gradient."""
    model = ViT(image_size=4, patch_size=patch_size, num_classes=1, dim=2, depth=1, heads=2, mlp_dim=1, channels=1,
                dtype="float64").to(backend.name)
    assert model.pos_embedding.data.shape == (1, grid * grid + 1, 2)
    assert model.patch_embed.weight.data.shape == (patch_size * patch_size, 2)
    images = backend.asarray(numpy.random.default_rng(0).standard_normal((3, 1, 4, 4)))
    logits = model.forward(images)
    assert logits.shape == (3, 1)
    assert model.blocks[0].attn.attn.shape == (3, 2, grid * grid + 1, grid * grid + 1)      # (B, H, T, T)
    model.zero_grad()
    model.backward(backend.asarray(numpy.random.default_rng(1).standard_normal((3, 1))))
    for name, parameter in model.named_parameters():
        assert numpy.isfinite(to_host(parameter.grad)).all(), name


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["dropout", "emb_dropout"])
def test_dropout_outside_unit_interval_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ViT(**TINY, **{name: value})


def test_integer_dtype_raises():
    with pytest.raises(ValueError, match="dtype"):
        ViT(**TINY, dtype="int32")


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 8, 8), (2, 2, 12, 12), (2, 2, 8, 4), (2, 8, 8), (2, 2, 4, 4)])
def test_wrong_input_shape_raises(backend, shape):
    model = make_model(backend)
    with pytest.raises(ValueError, match="image"):
        model.forward(backend.xp.zeros(shape))


# ---------------------------------------------------------------------------------------------
# The CLS token is repeated over the batch (regression)
# ---------------------------------------------------------------------------------------------

def test_each_image_alone_gives_its_row_of_the_batch(backend):
    model = make_model(backend).eval()
    images = random_images(backend, 4)
    batched = to_host(model.forward(images))
    for i in range(4):
        alone = to_host(model.forward(images[i:i + 1]))
        numpy.testing.assert_allclose(alone[0], batched[i], rtol=1e-12, atol=1e-14)


def test_batch_gradients_are_the_sum_of_single_image_gradients(backend):
    model = make_model(backend).eval()
    images, upstream = random_images(backend, 2), random_upstream(backend, 2)
    model.forward(images)
    batch_grad_images = to_host(model.backward(upstream))
    batch_grads = {name: to_host(p.grad).copy() for name, p in model.named_parameters()}
    model.zero_grad()
    single_grad_images = []
    for i in range(2):
        model.forward(images[i:i + 1])
        single_grad_images.append(to_host(model.backward(upstream[i:i + 1])))
    numpy.testing.assert_allclose(numpy.concatenate(single_grad_images), batch_grad_images, rtol=1e-10, atol=1e-13)
    assert numpy.any(batch_grads["cls_token"] != 0)
    for name, parameter in model.named_parameters():
        numpy.testing.assert_allclose(to_host(parameter.grad), batch_grads[name], rtol=1e-10, atol=1e-13,
                                      err_msg=name)


# ---------------------------------------------------------------------------------------------
# Parameter names
# ---------------------------------------------------------------------------------------------

EXPECTED_NAMES_DEPTH_2 = (
    ["cls_token", "pos_embedding", "patch_embed.weight", "patch_embed.bias"]
    + [f"blocks.{i}.{layer}.{kind}" for i in range(2)
       for layer in ["attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "fc1", "fc2"]
       for kind in ["weight", "bias"]]
    + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
)


def test_named_parameters_are_the_documented_list():
    model = ViT(**TINY)
    names = [name for name, _ in model.named_parameters()]
    assert names == EXPECTED_NAMES_DEPTH_2
    assert list(model.state_dict()) == EXPECTED_NAMES_DEPTH_2
    # every name appears, in the docstring's own notation, in the list in scratchvit/vit.py's docstring,
    # and in the same order
    documented = scratchvit.vit.__doc__.split("Parameter names", 1)[1]
    tokens = re.findall(r"(?:[\w.]|\{[^}]*\})+", documented)    # "blocks.{i}.fc1.{weight,bias}" is one token
    patterns = []
    for name in names:
        pattern = re.sub(r"\.(weight|bias)$", ".{weight,bias}", re.sub(r"^blocks\.\d+\.", "blocks.{i}.", name))
        assert pattern in tokens, f"{name} ({pattern}) is not in the documented list"
        if pattern not in patterns:
            patterns.append(pattern)
    positions = [tokens.index(pattern) for pattern in patterns]
    assert positions == sorted(positions), patterns
    assert len(patterns) == 11   # cls_token, pos_embedding, patch_embed, six per block, norm, head


def test_named_parameters_are_stable_across_instances():
    first = [(name, p.shape) for name, p in ViT(**TINY, seed=0).named_parameters()]
    second = [(name, p.shape) for name, p in ViT(**TINY, seed=5).named_parameters()]
    assert first == second
    assert len({name for name, _ in first}) == len(first)


# ---------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------------------------

def test_state_dict_round_trip_gives_identical_logits(backend):
    source, target = make_model(backend, seed=0).eval(), make_model(backend, seed=1).eval()
    images = random_images(backend, 3)
    assert not numpy.allclose(to_host(source.forward(images)), to_host(target.forward(images)))
    state = source.state_dict()
    assert all(type(value) is numpy.ndarray for value in state.values())
    target.load_state_dict(state)
    numpy.testing.assert_array_equal(to_host(target.forward(images)), to_host(source.forward(images)))
    for name, parameter in target.named_parameters():
        assert get_array_module(parameter.data) is backend.xp, name


def test_state_dict_is_a_copy(backend):
    model = make_model(backend)
    state = model.state_dict()
    state["head.bias"] += 1.0
    assert not numpy.array_equal(to_host(model.head.bias.data), state["head.bias"])


def test_load_state_dict_missing_key_raises_naming_it():
    model = ViT(**TINY)
    state = model.state_dict()
    del state["blocks.1.fc1.weight"]
    with pytest.raises(KeyError, match=re.escape("blocks.1.fc1.weight")):
        model.load_state_dict(state)


def test_load_state_dict_shape_mismatch_raises_naming_key_and_shapes():
    model = ViT(**TINY)
    state = model.state_dict()
    state["head.weight"] = numpy.zeros((8, 4), dtype=numpy.float32)
    before = model.state_dict()
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "head.weight" in message and "(8, 4)" in message and "(8, 3)" in message, message
    for name, value in model.state_dict().items():   # nothing was loaded half-way
        numpy.testing.assert_array_equal(value, before[name])


def test_load_state_dict_unexpected_key_raises_naming_it():
    model = ViT(**TINY)
    state = model.state_dict()
    state["blocks.2.fc1.weight"] = numpy.zeros((8, 16), dtype=numpy.float32)
    with pytest.raises((KeyError, ValueError), match=re.escape("blocks.2.fc1.weight")):
        model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Seeds and dtypes
# ---------------------------------------------------------------------------------------------

RANDOM_PARAMETERS = ["cls_token", "pos_embedding", "patch_embed.weight", "blocks.0.attn.qkv.weight",
                     "blocks.1.fc2.weight", "head.weight", "head.bias"]


def test_same_seed_same_weights_different_seed_different_weights():
    first, again, other = ViT(**TINY, seed=3).state_dict(), ViT(**TINY, seed=3).state_dict(), \
        ViT(**TINY, seed=4).state_dict()
    for name in first:
        numpy.testing.assert_array_equal(first[name], again[name], err_msg=name)
    for name in RANDOM_PARAMETERS:
        assert not numpy.any(first[name] == other[name]), name


def _float_arrays_held_by(model):
    """(where, array) for every floating-point array the model's layers hold: parameters, grads, caches."""
    for layer_index, layer in enumerate(model.layers()):
        for attribute, value in vars(layer).items():
            if isinstance(value, Parameter):
                yield f"{type(layer).__name__}.{attribute}.data", value.data
                yield f"{type(layer).__name__}.{attribute}.grad", value.grad
            elif hasattr(value, "dtype") and hasattr(value, "shape") and value.dtype.kind == "f":
                yield f"{layer_index}:{type(layer).__name__}.{attribute}", value


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_computes_in_its_dtype_end_to_end(backend, dtype):
    model = make_model(backend, dtype=dtype, dropout=0.1, emb_dropout=0.1)
    images = random_images(backend, 2, dtype=dtype)
    labels = backend.asarray([0, 2], dtype="int64")
    loss_layer = SoftmaxCrossEntropy(label_smoothing=0.1)
    logits = model.forward(images)
    loss = loss_layer.forward(logits, labels)
    grad_images = model.backward(loss_layer.backward())
    assert logits.dtype == numpy.dtype(dtype)
    assert loss.dtype == numpy.dtype(dtype)
    assert grad_images.dtype == numpy.dtype(dtype)
    held = list(_float_arrays_held_by(model))
    assert len(held) > 2 * len(model.parameters())   # the caches of the forward pass are there too
    for where, array in held:
        assert array.dtype == numpy.dtype(dtype), f"{where} is {array.dtype}"


# ---------------------------------------------------------------------------------------------
# .to(device)
# ---------------------------------------------------------------------------------------------

def test_to_moves_every_parameter_to_the_backend(backend):
    host_model = ViT(**TINY, dtype="float64")
    before = host_model.state_dict()
    model = ViT(**TINY, dtype="float64")
    assert model.to(backend.name) is model
    for name, parameter in model.named_parameters():
        assert get_array_module(parameter.data) is backend.xp, name
        assert get_array_module(parameter.grad) is backend.xp, name
        assert parameter.grad.shape == parameter.shape and parameter.grad.dtype == parameter.data.dtype
        numpy.testing.assert_array_equal(to_host(parameter.data), before[name], err_msg=name)
    images = random_images(backend, 2)
    numpy.testing.assert_allclose(to_host(model.forward(images)), to_host(host_model.forward(to_host(images))),
                                  rtol=1e-10, atol=1e-12)


def test_to_cpu_on_cpu_model_is_unchanged():
    model = ViT(**TINY)
    arrays = {name: parameter.data for name, parameter in model.named_parameters()}
    before = model.state_dict()
    model.to("cpu")
    for name, parameter in model.named_parameters():
        assert type(parameter.data) is numpy.ndarray
        numpy.testing.assert_array_equal(parameter.data, before[name])
        assert parameter.data is arrays[name]


def test_to_unknown_device_raises():
    with pytest.raises(ValueError, match="nope"):
        ViT(**TINY).to("nope")


# ---------------------------------------------------------------------------------------------
# Parameter
# ---------------------------------------------------------------------------------------------

def test_parameter_data_reassignment(backend):
    parameter = Parameter(backend.xp.zeros((2, 3)))
    assert parameter.grad.shape == (2, 3) and not numpy.any(to_host(parameter.grad))
    parameter.grad += 1.5
    same_shape = backend.asarray(numpy.arange(6.0).reshape(2, 3))
    parameter.data = same_shape
    assert parameter.data is same_shape
    numpy.testing.assert_array_equal(to_host(parameter.grad), numpy.full((2, 3), 1.5))   # kept
    parameter.data = backend.xp.ones((4,))
    assert parameter.shape == (4,) and parameter.size == 4
    assert parameter.grad.shape == (4,)
    assert get_array_module(parameter.grad) is backend.xp
    numpy.testing.assert_array_equal(to_host(parameter.grad), numpy.zeros(4))      # zeros of the new shape
    parameter.data = backend.xp.ones((4,), dtype="float32")
    assert parameter.grad.dtype == numpy.float32                                    # and of the new dtype


# ---------------------------------------------------------------------------------------------
# Training smoke test
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_overfits_a_tiny_batch(backend, dtype):
    config = dict(image_size=8, patch_size=4, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32, channels=1)
    model = ViT(**config, dtype=dtype, seed=0).to(backend.name)
    rng = numpy.random.default_rng(0)
    images = backend.asarray(rng.standard_normal((8, 1, 8, 8)), dtype=dtype)
    labels = backend.asarray(rng.integers(0, 4, 8), dtype="int64")
    optimizer = AdamW(model.parameters(), lr=1e-2)
    loss_layer = SoftmaxCrossEntropy()
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        losses.append(float(to_host(loss_layer.forward(model.forward(images), labels))))
        model.backward(loss_layer.backward())
        optimizer.step()
        if losses[-1] < 0.1:
            break
    assert losses[0] > 1.0
    assert min(losses) < 0.1, losses[-5:]
    model.eval()
    predictions = to_host(model.forward(images)).argmax(axis=1)
    numpy.testing.assert_array_equal(predictions, to_host(labels))
