"""The whole ViT's backward pass against finite differences (scratchvit.gradcheck), in float64.

- element-wise: every parameter element (cls_token and pos_embedding included) and every input pixel of
  tiny models (a few hundred numbers), with dropout off, and with dropout on in train mode under
  fix_dropout_masks(); the loss is sum(G * logits) with a random G, or cross-entropy on drawn labels;
- directional: one random unit direction over all parameters and the images of a larger model;
- the command line `python -m scratchvit.gradcheck` (its main()).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scratchvit import ViT
from scratchvit.backend import host_generator, to_host
from scratchvit.gradcheck import check_directional, check_layer, main, randomize_parameters
from scratchvit.gradcheck_report import DirectionalReport, GradCheckReport
from scratchvit.layers import SoftmaxCrossEntropy

# Tolerances (float64, central differences, eps = 1e-6). Element-wise, an element passes if
# |numeric - analytic| <= ATOL + RTOL * |numeric|: for a correct backward the finite difference is off by
# rounding ~1e-16 * |L| / eps ~ 1e-10 plus truncation ~eps^2 ~ 1e-12; over 300 Hypothesis examples per
# test the worst was err/tol 0.07 (~7e-9 absolute). A wrong formula is off by about the gradient itself.
# Directional: one number, sum(grad * d) for a unit direction d (~1e-2..1 in size), whose finite
# difference is good to ~1e-10 absolute (worst seen: err/tol 0.03), so it is checked more tightly; a
# gradient wrong by 0.1% already fails it (test below).
EPS = 1e-6
ATOL = 1e-7
RTOL = 1e-5
DIRECTIONAL_ATOL = 1e-8
DIRECTIONAL_RTOL = 1e-6

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@st.composite
def tiny_configs(draw):
    """At most ~500 parameters: image 1-6 pixels a side, dim = heads * head_dim <= 8, mlp_dim <= 8."""
    patch = draw(st.integers(1, 3), label="patch_size")
    grid = draw(st.integers(1, 2), label="grid")
    heads = draw(st.integers(1, 2), label="heads")
    dim = heads * draw(st.integers(1, 4), label="head_dim")
    return dict(image_size=patch * grid, patch_size=patch, num_classes=draw(st.integers(2, 4), label="classes"),
                dim=dim, depth=draw(st.integers(1, 2), label="depth"), heads=heads,
                mlp_dim=draw(st.integers(1, 8), label="mlp_dim"), channels=draw(st.integers(1, 2), label="channels"))


def build(backend, config, seed, **extra):
    model = ViT(**config, **extra, dtype="float64", seed=seed).to(backend)
    randomize_parameters(model, seed=seed, std=0.5)       # not the init: LayerNorm gamma = 1, beta = 0 hides bugs
    return model


def draw_images(data, backend, batch, config):
    shape = (batch, config["channels"], config["image_size"], config["image_size"])
    images = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-3, 3, allow_nan=False)), label="images")
    return backend.asarray(images)


def draw_labels(data, backend, batch, classes):
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch), label="labels")
    return backend.asarray(np.array(labels, dtype=np.int64))


def assert_every_tensor_checked(report, model):
    assert report.names() == ["input"] + [name for name, _ in model.named_parameters()]
    assert "cls_token" in report.names() and "pos_embedding" in report.names()


def check(model, images, **kwargs):
    report = check_layer(model, images, eps=EPS, atol=ATOL, rtol=RTOL, **kwargs)
    assert isinstance(report, GradCheckReport)
    assert report.passed, "\n" + report.table()
    assert_every_tensor_checked(report, model)
    return report


def directional(model, images, labels=None, **kwargs):
    report = check_directional(model, images, labels, eps=EPS, atol=DIRECTIONAL_ATOL, rtol=DIRECTIONAL_RTOL, **kwargs)
    assert isinstance(report, DirectionalReport)
    assert report.passed, "\n" + report.table()
    return report


# ----------------------------------------------------------------------------------------------------
# Element-wise

@fixture_ok
@given(data=st.data(), config=tiny_configs(), batch=st.integers(1, 3), seed=seeds)
def test_vit_elementwise_linear_loss(backend, data, config, batch, seed):
    """L = sum(G * logits), dropout off."""
    model = build(backend, config, seed)
    check(model, draw_images(data, backend, batch, config), seed=seed)


@fixture_ok
@given(data=st.data(), config=tiny_configs(), batch=st.integers(1, 3), smoothing=st.sampled_from([0.0, 0.1]),
       seed=seeds)
def test_vit_elementwise_cross_entropy(backend, data, config, batch, smoothing, seed):
    """L = g * cross_entropy(logits, labels), dropout off."""
    model = build(backend, config, seed)
    images = draw_images(data, backend, batch, config)
    labels = draw_labels(data, backend, batch, config["num_classes"])
    check(model, images, loss=SoftmaxCrossEntropy(label_smoothing=smoothing), labels=labels, seed=seed)


@fixture_ok
@given(data=st.data(), config=tiny_configs(), batch=st.integers(1, 3), use_cross_entropy=st.booleans(), seed=seeds)
def test_vit_elementwise_dropout_fixed_masks(backend, data, config, batch, use_cross_entropy, seed):
    """Dropout on (0.2 in the blocks, 0.1 on the embeddings), train mode, every mask held fixed."""
    model = build(backend, config, seed, dropout=0.2, emb_dropout=0.1)
    model.train()
    model.fix_dropout_masks()
    images = draw_images(data, backend, batch, config)
    kwargs = {}
    if use_cross_entropy:
        kwargs = dict(loss=SoftmaxCrossEntropy(), labels=draw_labels(data, backend, batch, config["num_classes"]))
    check(model, images, seed=seed, **kwargs)
    masks = [layer.mask for layer in model.dropout_layers()]
    assert all(mask is not None for mask in masks)                 # every dropout layer was active
    assert all(layer.mask_fixed for layer in model.dropout_layers())   # still fixed: the caller's choice


@fixture_ok
@given(data=st.data(), config=tiny_configs(), batch=st.integers(1, 3), seed=seeds)
def test_vit_elementwise_dropout_eval_mode(backend, data, config, batch, seed):
    """Dropout configured but the model in eval mode: every dropout is the identity."""
    model = build(backend, config, seed, dropout=0.2, emb_dropout=0.1).eval()
    check(model, draw_images(data, backend, batch, config), seed=seed)


# ----------------------------------------------------------------------------------------------------
# Directional, on a larger model (image 8, patch 2: 17 tokens; dim 8, depth 2; ~1700 parameters)

SMALL = dict(image_size=8, patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=16, channels=1)


@fixture_ok
@given(batch=st.integers(1, 3), use_cross_entropy=st.booleans(), dropout=st.booleans(), seed=seeds)
def test_vit_directional(backend, batch, use_cross_entropy, dropout, seed):
    extra = dict(dropout=0.2, emb_dropout=0.1) if dropout else {}
    model = build(backend, SMALL, seed, **extra)
    if dropout:
        model.fix_dropout_masks()
    rng = host_generator(seed)
    images = backend.asarray(rng.standard_normal((batch, 1, 8, 8)))
    labels = backend.asarray(rng.integers(0, 4, batch)) if use_cross_entropy else None
    report = directional(model, images, labels, seed=seed)
    assert report.num_elements == sum(p.size for p in model.parameters()) + images.size
    assert abs(report.analytic) > 0


def test_vit_directional_parameters_only(backend):
    model = build(backend, SMALL, 3)
    images = backend.asarray(host_generator(3).standard_normal((2, 1, 8, 8)))
    report = directional(model, images, backend.asarray(np.array([1, 3])), include_input=False)
    assert report.num_elements == sum(p.size for p in model.parameters())
    assert "input" not in report.tensors


# ----------------------------------------------------------------------------------------------------
# The checks must catch a wrong model gradient, and restore the model

class ViTForgettingClsGradient(ViT):
    def backward(self, grad_logits):
        grad_images = super().backward(grad_logits)
        self.cls_token.grad[...] = 0.0
        return grad_images


class ViTWithScaledGradient(ViT):
    def backward(self, grad_logits):
        return super().backward(grad_logits * 1.001)


TINY = dict(image_size=4, patch_size=2, num_classes=3, dim=4, depth=1, heads=2, mlp_dim=4, channels=1)


def test_elementwise_catches_missing_cls_token_gradient(backend):
    model = ViTForgettingClsGradient(**TINY, dtype="float64").to(backend)
    randomize_parameters(model, seed=1)
    images = backend.asarray(host_generator(1).standard_normal((2, 1, 4, 4)))
    report = check_layer(model, images, eps=EPS, atol=ATOL, rtol=RTOL)
    assert report.failures() == [report["cls_token"]]
    assert report.worst().name == "cls_token"


def test_directional_catches_a_gradient_off_by_a_tenth_of_a_percent(backend):
    model = ViTWithScaledGradient(**SMALL, dtype="float64").to(backend)
    randomize_parameters(model, seed=2)
    images = backend.asarray(host_generator(2).standard_normal((2, 1, 8, 8)))
    report = check_directional(model, images, backend.asarray(np.array([0, 2])), eps=EPS,
                               atol=DIRECTIONAL_ATOL, rtol=DIRECTIONAL_RTOL)
    assert not report.passed
    assert report.rel_error == pytest.approx(1e-3, rel=1e-2)
    assert "FAILED" in str(report)


def test_checks_restore_the_model_exactly(backend):
    model = build(backend, TINY, 4, dropout=0.2)
    before = {name: to_host(p.data).copy() for name, p in model.named_parameters()}
    images = backend.asarray(host_generator(4).standard_normal((2, 1, 4, 4)))
    images_before = to_host(images).copy()
    check(model, images)
    directional(model, images, backend.asarray(np.array([0, 1])))
    for name, parameter in model.named_parameters():
        np.testing.assert_array_equal(to_host(parameter.data), before[name], err_msg=name)
        assert not to_host(parameter.grad).any(), name                    # the grads it had: zeros
    np.testing.assert_array_equal(to_host(images), images_before)
    assert not any(layer.mask_fixed for layer in model.dropout_layers())  # held only during the checks


def test_refuses_a_float32_model(backend):
    model = ViT(**TINY).to(backend)
    images = backend.asarray(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="float64"):
        check_layer(model, images)
    with pytest.raises(ValueError, match="float64"):
        check_directional(model, images, backend.asarray(np.array([0])))


# ----------------------------------------------------------------------------------------------------
# python -m scratchvit.gradcheck

def test_command_line_checks_everything(backend, capsys):
    assert main(["--device", backend.name]) == 0
    out = capsys.readouterr().out
    for name in ("Patchify", "Linear", "LayerNorm", "GELU", "Dropout", "MultiHeadSelfAttention",
                 "SoftmaxCrossEntropy", "ViT", "directional", "cls_token", "pos_embedding"):
        assert name in out, name
    assert "all 9 checks passed" in out
