"""Every layer, the whole ViT and AdamW against PyTorch, in float64, to about 1e-10.

The whole ViT and the training step are held against tools/torch_reference.py, the one PyTorch copy of
scratchvit's ViT (the benchmark's --compare-torch times it), so these tests also prove that reference.
PyTorch is not a dependency of scratchvit: this module skips where it is not installed.
Forward outputs, input gradients and parameter gradients are compared for random inputs and a
random upstream gradient; our side runs on the `backend` fixture, PyTorch on its CPU.
"""
import pytest

torch = pytest.importorskip("torch")

import numpy  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scratchvit.backend import to_host  # noqa: E402
from scratchvit.layers import (GELU, LayerNorm, Linear, MultiHeadSelfAttention, Patchify,  # noqa: E402
                               SoftmaxCrossEntropy, softmax, softmax_backward)
from scratchvit.layers import Parameter  # noqa: E402
from scratchvit.optim import AdamW  # noqa: E402
from scratchvit.train import parameter_groups  # noqa: E402
from scratchvit.train_step import TrainStep  # noqa: E402
from scratchvit.vit import ViT  # noqa: E402
from tools.torch_reference import TorchAttention, TorchTrainStep, torch_vit  # noqa: E402

F = torch.nn.functional

with_backend = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)

RTOL, ATOL = 1e-10, 1e-12


def leaf(array):
    """A float64 torch leaf tensor that records its gradient, from a NumPy or CuPy array."""
    return torch.tensor(to_host(array), dtype=torch.float64, requires_grad=True)


def close(ours, theirs, what=""):
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach().numpy()
    numpy.testing.assert_allclose(to_host(ours), theirs, rtol=RTOL, atol=ATOL, err_msg=what)


def move_to(layer, backend):
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data)
    return layer


def torch_patchify(images, p):
    """vit-pytorch's rearrange "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", with unfold."""
    B, C = images.shape[:2]
    grid = images.unfold(2, p, p).unfold(3, p, p)              # (B, C, Hp, Wp, p1, p2)
    return grid.permute(0, 2, 3, 4, 5, 1).reshape(B, -1, p * p * C)


def copy_linear(ours, theirs):
    """Our weight is (in, out), torch's (out, in)."""
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(to_host(ours.weight.data).T))
        theirs.bias.copy_(torch.from_numpy(to_host(ours.bias.data)))


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

@with_backend
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), d_in=st.integers(1, 7), d_out=st.integers(1, 7),
       seed=seeds)
def test_linear(backend, lead, d_in, d_out, seed):
    rng = numpy.random.default_rng(seed)
    ours = move_to(Linear(d_in, d_out, dtype="float64", rng=rng), backend)
    theirs = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    copy_linear(ours, theirs)
    x, g = rng.standard_normal((*lead, d_in)), rng.standard_normal((*lead, d_out))
    x_t = leaf(x)
    y_t = theirs(x_t)
    y_t.backward(torch.from_numpy(g))
    close(ours.forward(backend.asarray(x)), y_t, "output")
    close(ours.backward(backend.asarray(g)), x_t.grad, "input gradient")
    close(ours.weight.grad, theirs.weight.grad.T, "weight gradient")
    close(ours.bias.grad, theirs.bias.grad, "bias gradient")


@with_backend
@given(rows=st.integers(1, 6), dim=st.integers(2, 16), seed=seeds)
def test_layernorm(backend, rows, dim, seed):
    rng = numpy.random.default_rng(seed)
    ours = LayerNorm(dim, dtype="float64")
    ours.weight.data = rng.standard_normal(dim)
    ours.bias.data = rng.standard_normal(dim)
    move_to(ours, backend)
    theirs = torch.nn.LayerNorm(dim, eps=ours.eps, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(to_host(ours.weight.data)))
        theirs.bias.copy_(torch.from_numpy(to_host(ours.bias.data)))
    x = 3 + 2 * rng.standard_normal((rows, 2, dim))
    g = rng.standard_normal((rows, 2, dim))
    x_t = leaf(x)
    theirs(x_t).backward(torch.from_numpy(g))
    close(ours.forward(backend.asarray(x)), theirs(x_t), "output")
    close(ours.backward(backend.asarray(g)), x_t.grad, "input gradient")
    close(ours.weight.grad, theirs.weight.grad, "weight gradient")
    close(ours.bias.grad, theirs.bias.grad, "bias gradient")


def test_gelu(backend):
    rng = numpy.random.default_rng(0)
    x = numpy.concatenate([numpy.linspace(-8, 8, 161), 3 * rng.standard_normal(100), [-50.0, 50.0]])
    g = rng.standard_normal(x.shape)
    ours = GELU()
    x_t = leaf(x)
    y_t = F.gelu(x_t, approximate="tanh")
    y_t.backward(torch.from_numpy(g))
    close(ours.forward(backend.asarray(x)), y_t, "output")
    close(ours.backward(backend.asarray(g)), x_t.grad, "input gradient")


@with_backend
@given(rows=st.integers(1, 5), n=st.integers(1, 9), scale=st.sampled_from([1.0, 30.0, 1e4]), seed=seeds)
def test_softmax(backend, rows, n, scale, seed):
    rng = numpy.random.default_rng(seed)
    scores, g = scale * rng.standard_normal((rows, n)), rng.standard_normal((rows, n))
    s_t = leaf(scores)
    p_t = torch.softmax(s_t, dim=-1)
    p_t.backward(torch.from_numpy(g))
    probs = softmax(backend.asarray(scores))
    close(probs, p_t, "output")
    close(softmax_backward(probs, backend.asarray(g)), s_t.grad, "input gradient")


@with_backend
@given(B=st.integers(1, 8), C=st.integers(2, 10), smoothing=st.sampled_from([0.0, 0.1, 0.3]),
       scale=st.sampled_from([1.0, 10.0, 1e4]), seed=seeds)
def test_softmax_cross_entropy(backend, B, C, smoothing, scale, seed):
    rng = numpy.random.default_rng(seed)
    logits, labels = scale * rng.standard_normal((B, C)), rng.integers(0, C, B)
    upstream = float(rng.uniform(0.5, 2.0))
    z_t = leaf(logits)
    loss_t = F.cross_entropy(z_t, torch.from_numpy(labels), label_smoothing=smoothing)
    loss_t.backward(torch.tensor(upstream, dtype=torch.float64))
    ours = SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = ours.forward(backend.asarray(logits), backend.asarray(labels))
    numpy.testing.assert_allclose(float(to_host(loss)), loss_t.item(), rtol=RTOL, atol=1e-9 if scale > 1e3 else ATOL)
    close(ours.backward(upstream), z_t.grad, "logits gradient")


@with_backend
@given(B=st.integers(1, 2), T=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_multi_head_self_attention(backend, B, T, heads, seed):
    dim = 8
    rng = numpy.random.default_rng(seed)
    ours = move_to(MultiHeadSelfAttention(dim, heads, dtype="float64", rng=rng), backend)
    theirs = TorchAttention(dim, heads, dtype=torch.float64)
    copy_linear(ours.qkv, theirs.qkv)
    copy_linear(ours.proj, theirs.proj)
    x, g = 2 * rng.standard_normal((B, T, dim)), rng.standard_normal((B, T, dim))
    x_t = leaf(x)
    y_t = theirs(x_t)
    y_t.backward(torch.from_numpy(g))
    close(ours.forward(backend.asarray(x)), y_t, "output")
    close(ours.backward(backend.asarray(g)), x_t.grad, "input gradient")
    for name in ("qkv", "proj"):
        close(getattr(ours, name).weight.grad, getattr(theirs, name).weight.grad.T, f"{name}.weight gradient")
        close(getattr(ours, name).bias.grad, getattr(theirs, name).bias.grad, f"{name}.bias gradient")


@with_backend
@given(B=st.integers(1, 2), C=st.integers(1, 3), Hp=st.integers(1, 3), Wp=st.integers(1, 3), p=st.integers(1, 4),
       seed=seeds)
def test_patchify(backend, B, C, Hp, Wp, p, seed):
    rng = numpy.random.default_rng(seed)
    images = rng.standard_normal((B, C, Hp * p, Wp * p))
    g = rng.standard_normal((B, Hp * Wp, p * p * C))
    images_t = leaf(images)
    patches_t = torch_patchify(images_t, p)
    patches_t.backward(torch.from_numpy(g))
    ours = Patchify(p)
    numpy.testing.assert_array_equal(to_host(ours.forward(backend.asarray(images))), patches_t.detach().numpy())
    numpy.testing.assert_array_equal(to_host(ours.backward(backend.asarray(g))), images_t.grad.numpy())


# ---------------------------------------------------------------------------------------------
# The whole ViT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, heads", [(1, 2), (3, 4)])
def test_vit_forward_and_every_gradient(backend, channels, heads):
    config = dict(image_size=8, patch_size=4, num_classes=5, dim=8, depth=2, heads=heads, mlp_dim=16,
                  channels=channels)
    model = ViT(**config, dtype="float64", seed=3)
    rng = numpy.random.default_rng(4)
    for name, parameter in model.named_parameters():   # LayerNorm weights away from 1 and biases from 0
        if "norm" in name:
            parameter.data = parameter.data + 0.3 * rng.standard_normal(parameter.shape)
    reference = torch_vit(dict(config, eps=model.norm.eps), dtype="float64", state=model.state_dict())
    model.to(backend.name)
    images = rng.standard_normal((3, channels, 8, 8))
    g = rng.standard_normal((3, 5))
    images_t = leaf(images)
    logits_t = reference(images_t)
    logits_t.backward(torch.from_numpy(g))
    close(model.forward(backend.asarray(images)), logits_t, "logits")
    close(model.backward(backend.asarray(g)), images_t.grad, "image gradient")
    gradients = reference.scratchvit_gradients()
    for name, parameter in model.named_parameters():
        close(parameter.grad, gradients[name], f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw(backend, weight_decay, grouped):
    rng = numpy.random.default_rng(5)
    shapes = [(3, 4), (5,), (2, 3)]
    initial = [rng.standard_normal(shape) for shape in shapes]
    ours = [Parameter(backend.asarray(value)) for value in initial]
    theirs = [torch.tensor(value, dtype=torch.float64, requires_grad=True) for value in initial]
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    if grouped:
        optimizer = AdamW([{"params": ours[:2], "weight_decay": weight_decay}, {"params": ours[2:]}],
                          weight_decay=0.0, **hyper)
        reference = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": weight_decay},
                                       {"params": theirs[2:]}], weight_decay=0.0, **hyper)
    else:
        optimizer = AdamW(ours, weight_decay=weight_decay, **hyper)
        reference = torch.optim.AdamW(theirs, weight_decay=weight_decay, **hyper)
    for _ in range(6):
        grads = [rng.standard_normal(shape) for shape in shapes]
        optimizer.zero_grad()
        for parameter, tensor, grad in zip(ours, theirs, grads):
            parameter.grad += backend.asarray(grad)
            tensor.grad = torch.from_numpy(grad.copy())
        optimizer.step()
        reference.step()
        for index, (parameter, tensor) in enumerate(zip(ours, theirs)):
            close(parameter.data, tensor, f"parameter {index}")


# ---------------------------------------------------------------------------------------------
# The reference as the benchmark uses it: loss, every gradient and two training steps
# ---------------------------------------------------------------------------------------------

TINY_CONFIG = dict(image_size=8, patch_size=4, num_classes=5, dim=8, depth=1, heads=2, mlp_dim=16, channels=1)


def _tiny_float64_model(channels):
    model = ViT(**dict(TINY_CONFIG, channels=channels, depth=2), dtype="float64", seed=3)
    rng = numpy.random.default_rng(4)
    for name, parameter in model.named_parameters():      # LayerNorm weights away from 1, biases away from 0
        if "norm" in name:
            parameter.data = parameter.data + 0.3 * rng.standard_normal(parameter.shape)
    return model, rng


@pytest.mark.parametrize("channels", [1, 3])
def test_torch_reference_matches_scratchvit_logits_and_gradients(channels):
    model, rng = _tiny_float64_model(channels)
    reference = torch_vit(dict(TINY_CONFIG, channels=channels, depth=2), dtype="float64", state=model.state_dict())
    assert list(dict(reference.named_parameters())) == list(dict(model.named_parameters()))
    images = rng.standard_normal((3, channels, 8, 8))
    labels = rng.integers(0, 5, 3)

    loss_fn = SoftmaxCrossEntropy()
    logits = model.forward(images)
    loss = loss_fn.forward(logits, labels)
    image_grad = model.backward(loss_fn.backward())

    images_t = torch.tensor(images, requires_grad=True)
    logits_t = reference(images_t)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()

    numpy.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert float(loss) == pytest.approx(loss_t.item(), rel=1e-12)
    numpy.testing.assert_allclose(image_grad, images_t.grad.numpy(), rtol=1e-9, atol=1e-13)
    torch_grads = reference.scratchvit_gradients()
    for name, parameter in model.named_parameters():
        numpy.testing.assert_allclose(parameter.grad, torch_grads[name], rtol=1e-9, atol=1e-13,
                                      err_msg=f"gradient of {name}")


def test_torch_train_step_matches_scratchvit_train_step():
    """Two full steps (clipping active, AdamW with decay groups) leave the same weights on both sides."""
    model, rng = _tiny_float64_model(channels=1)
    reference = torch_vit(dict(TINY_CONFIG, depth=2), dtype="float64", state=model.state_dict())
    ours = TrainStep(model, AdamW(parameter_groups(model, 0.05), lr=2e-3), SoftmaxCrossEntropy(), clip_grad_norm=0.05)
    theirs = TorchTrainStep(reference, lr=2e-3, weight_decay=0.05, clip_grad_norm=0.05)
    for _ in range(2):
        images, labels = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 5, 4)
        loss = ours(images, labels)
        loss_t = theirs(torch.from_numpy(images), torch.from_numpy(labels))
        assert float(loss) == pytest.approx(loss_t.item(), rel=1e-10)
        assert float(ours.optimizer.grad_norm()) == pytest.approx(0.05, rel=1e-4)    # the clipping was active
    after = reference.scratchvit_state()
    for name, value in model.state_dict().items():
        numpy.testing.assert_allclose(value, after[name], rtol=1e-9, atol=1e-12, err_msg=name)
