"""Every layer's backward pass against central finite differences (scratchvit.gradcheck), in float64.

Hypothesis draws the shapes, the input values (floats in [-3, 3]), the parameter values (random, never
the identity initialisation: LayerNorm's gamma = 1, beta = 0 would hide bugs) and the seed of the random
upstream gradient. The second half checks the checker: it must catch known-wrong backward passes, refuse
float32, and leave the layer exactly as it found it.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scratchvit.backend import host_generator, to_host
from scratchvit.gradcheck import check_layer, randomize_parameters
from scratchvit.gradcheck_report import GradCheckReport, TensorCheck, format_table
from scratchvit.layers import (GELU, Dropout, Layer, LayerNorm, Linear, MultiHeadSelfAttention,
                               Patchify, SoftmaxCrossEntropy, softmax, softmax_backward)

# Tolerances, float64, central differences with eps = 1e-6; an element passes if
# |numeric - analytic| <= ATOL + RTOL * |numeric|. For a correct backward the finite difference is off by
# rounding, ~1e-16 * |y| / eps ~ 1e-10 * |y| (y the layer's output), plus truncation ~eps^2 * (third
# derivative) / 6 ~ 1e-12: typically 1e-10 absolute; the worst seen over 300 Hypothesis examples per test
# was 1.2e-8 (attention with outputs ~50 and gradients up to ~10), i.e. err/tol 0.15, and 0.04 for
# LayerNorm, whose near-constant rows (rstd up to 1/sqrt(1e-5) ~ 300) make it steep: RTOL covers those.
# A wrong formula is off by about the gradient itself, far above 1e-7 + 1e-5 * |numeric|: every bug
# planted below fails by orders of magnitude.
EPS = 1e-6
ATOL = 1e-7
RTOL = 1e-5

# The `backend` fixture is function-scoped but stateless (a Backend naming numpy or cupy), so reusing it
# across Hypothesis examples is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

seeds = st.integers(min_value=0, max_value=2**32 - 1)
leading_axes = st.lists(st.integers(min_value=1, max_value=3), min_size=0, max_size=3).map(tuple)


def values(shape, bound=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(-bound, bound, allow_nan=False, allow_infinity=False))


def on_backend(backend, layer, seed=None, std=0.5):
    """Move a host-built float64 layer to the backend and (optionally) give it random parameters."""
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data, "float64")
    if seed is not None:
        randomize_parameters(layer, seed=seed, std=std)
    return layer


def check(layer, inputs, **kwargs):
    report = check_layer(layer, inputs, eps=EPS, atol=ATOL, rtol=RTOL, **kwargs)
    assert isinstance(report, GradCheckReport)
    assert report.passed, "\n" + report.table()
    return report


# ----------------------------------------------------------------------------------------------------
# The layers

@fixture_ok
@given(data=st.data(), batch=st.integers(1, 3), channels=st.integers(1, 3), patch=st.integers(1, 3),
       grid_h=st.integers(1, 3), grid_w=st.integers(1, 3), seed=seeds)
def test_patchify(backend, data, batch, channels, patch, grid_h, grid_w, seed):
    images = data.draw(values((batch, channels, grid_h * patch, grid_w * patch)), label="images")
    report = check(Patchify(patch), backend.asarray(images), seed=seed)
    assert report.names() == ["input"]


@fixture_ok
@given(data=st.data(), lead=leading_axes, d_in=st.integers(1, 6), d_out=st.integers(1, 6), seed=seeds)
def test_linear(backend, data, lead, d_in, d_out, seed):
    x = data.draw(values(lead + (d_in,)), label="x")
    layer = on_backend(backend, Linear(d_in, d_out, dtype="float64", rng=host_generator(seed)), seed=seed)
    report = check(layer, backend.asarray(x), seed=seed)
    assert report.names() == ["input", "weight", "bias"]


@fixture_ok
@given(data=st.data(), lead=leading_axes, dim=st.integers(1, 6), seed=seeds)
def test_layernorm(backend, data, lead, dim, seed):
    x = data.draw(values(lead + (dim,)), label="x")
    layer = on_backend(backend, LayerNorm(dim, dtype="float64"), seed=seed)   # random gamma and beta
    report = check(layer, backend.asarray(x), seed=seed)
    assert report.names() == ["input", "weight", "bias"]


@fixture_ok
@given(data=st.data(), lead=leading_axes, dim=st.integers(1, 6), seed=seeds)
def test_layernorm_well_spread_rows(backend, data, lead, dim, seed):
    """Rows of distinct, well-spread values (Hypothesis' arrays favour repeated values and zeros)."""
    x = 3.0 * host_generator(seed).standard_normal(lead + (dim,))
    layer = on_backend(backend, LayerNorm(dim, dtype="float64"), seed=seed + 1, std=1.0)
    check(layer, backend.asarray(x), seed=seed)


@fixture_ok
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), seed=seeds)
def test_gelu(backend, data, shape, seed):
    x = data.draw(values(shape, bound=5.0), label="x")
    check(GELU(), backend.asarray(x), seed=seed)


def test_gelu_zero_dim(backend):
    check(GELU(), backend.asarray(np.array(0.7)), seed=1)   # a scalar output: L = g * y


@fixture_ok
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4),
       p=st.floats(0.0, 0.9, exclude_min=True), seed=seeds)
def test_dropout_train_fixed_mask(backend, data, shape, p, seed):
    x = backend.asarray(data.draw(values(shape), label="x"))
    layer = Dropout(p, seed=seed)
    layer.train()
    layer.fix_mask()
    out = layer.forward(x)                       # draws the mask the check then reuses
    mask = to_host(layer.mask).copy()
    assert set(np.unique(mask)) <= {0.0, 1.0 / (1.0 - p)}
    report = check(layer, x, seed=seed)
    np.testing.assert_array_equal(to_host(layer.mask), mask)            # the same mask throughout
    np.testing.assert_allclose(report["input"].analytic, report["input"].numeric, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(to_host(out), to_host(x) * mask)


@fixture_ok
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4),
       p=st.floats(0.0, 0.9, exclude_min=True), seed=seeds)
def test_dropout_eval(backend, data, shape, p, seed):
    x = backend.asarray(data.draw(values(shape), label="x"))
    layer = Dropout(p, seed=seed).eval()
    report = check(layer, x, seed=seed)
    # in eval mode dropout is the identity, so dL/dx is the upstream gradient itself: nonzero everywhere
    assert report["input"].max_abs_numeric > 0


@fixture_ok
@given(data=st.data(), batch=st.integers(1, 3), tokens=st.integers(1, 5), heads=st.integers(1, 3),
       head_dim=st.integers(1, 4), seed=seeds)
def test_multi_head_self_attention(backend, data, batch, tokens, heads, head_dim, seed):
    dim = heads * head_dim
    x = data.draw(values((batch, tokens, dim)), label="x")
    layer = MultiHeadSelfAttention(dim, heads, dtype="float64", rng=host_generator(seed))
    on_backend(backend, layer, seed=seed)
    report = check(layer, backend.asarray(x), seed=seed)
    assert report.names() == ["input", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]


@fixture_ok
@given(data=st.data(), batch=st.integers(1, 3), classes=st.integers(1, 6),
       smoothing=st.sampled_from([0.0, 0.1]), seed=seeds)
def test_softmax_cross_entropy(backend, data, batch, classes, smoothing, seed):
    logits = data.draw(values((batch, classes), bound=5.0), label="logits")
    labels = np.array(data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch),
                                label="labels"), dtype=np.int64)
    loss = SoftmaxCrossEntropy(label_smoothing=smoothing)
    report = check(loss, backend.asarray(logits), labels=backend.asarray(labels), seed=seed)
    assert report.names() == ["input"]
    # the labels can also ride along in the inputs tuple: integer arrays are passed on, not differentiated
    report2 = check(loss, (backend.asarray(logits), backend.asarray(labels)), seed=seed)
    assert report2.names() == ["input"]


# ----------------------------------------------------------------------------------------------------
# The checker itself: it must catch wrong backward passes...

class Softmax(Layer):
    """Row softmax; `bug` selects a wrong backward."""

    def __init__(self, bug=None):
        self.bug = bug

    def forward(self, x):
        self.p = softmax(x)
        return self.p

    def backward(self, g):
        if self.bug == "mean":     # subtracts the plain row mean of g instead of sum(g * p)
            return self.p * (g - g.mean(axis=-1, keepdims=True))
        return softmax_backward(self.p, g)


class LayerNormWithoutMeanTerm(LayerNorm):
    def backward(self, grad_out):
        d_x = super().backward(grad_out)
        h = grad_out * self.weight.data
        return d_x + self.rstd * h.mean(axis=-1, keepdims=True)    # forgets "- mean(h)"


class LinearOverwritingGrads(Linear):
    def backward(self, grad_out):
        self.weight.grad[...] = 0.0
        self.bias.grad[...] = 0.0
        return super().backward(grad_out)                          # '=' instead of '+=' in effect


class InPlaceForward(Layer):
    def forward(self, x):
        x *= 2.0                                                   # modifies the caller's array
        return x * 1.0

    def backward(self, g):
        return 2.0 * g


class InPlaceBackward(Layer):
    def forward(self, x):
        return 3.0 * x

    def backward(self, g):
        g *= 3.0                                                   # modifies the caller's gradient
        return g


class Recorder(Layer):
    """The identity, recording the upstream gradient it is given."""

    def forward(self, x):
        return x * 1.0

    def backward(self, g):
        self.upstream = g
        return g


class Noisy(Layer):
    """A layer with unfixed randomness: finite differences of it are meaningless."""

    def __init__(self):
        self.rng = np.random.default_rng()

    def forward(self, x):
        return x * (1.0 + get_xp(x).asarray(self.rng.random(x.shape)))

    def backward(self, g):
        return g


def get_xp(x):
    from scratchvit.backend import get_array_module
    return get_array_module(x)


def random_array(backend, shape, seed=0):
    return backend.asarray(host_generator(seed).standard_normal(shape), "float64")


def test_upstream_gradient_is_random_and_seeded(backend):
    layer = Recorder()
    x = random_array(backend, (2, 3, 4))
    check(layer, x, seed=5)
    first = to_host(layer.upstream).copy()
    assert np.unique(first).size == first.size           # not all ones, not constant
    check(layer, x, seed=5)
    np.testing.assert_array_equal(to_host(layer.upstream), first)
    check(layer, x, seed=6)
    assert not np.array_equal(to_host(layer.upstream), first)


def test_catches_softmax_backward_that_an_all_ones_gradient_hides(backend):
    x = random_array(backend, (3, 5))
    buggy = Softmax(bug="mean")
    # with an all-ones upstream gradient the bug is invisible: both give exactly zero
    buggy.forward(x)
    ones = backend.xp.ones((3, 5))
    np.testing.assert_allclose(to_host(buggy.backward(ones)), 0.0, atol=1e-15)
    np.testing.assert_allclose(to_host(softmax_backward(buggy.p, ones)), 0.0, atol=1e-15)
    # the random upstream gradient exposes it
    report = check_layer(buggy, x, eps=EPS, atol=ATOL, rtol=RTOL)
    assert not report.passed
    assert "FAIL" in report.table()
    check(Softmax(), x)


def test_catches_layernorm_without_mean_term(backend):
    layer = on_backend(backend, LayerNormWithoutMeanTerm(5, dtype="float64"), seed=3)
    report = check_layer(layer, random_array(backend, (2, 3, 5)), eps=EPS, atol=ATOL, rtol=RTOL)
    assert not report.passed
    assert not report["input"].passed
    assert report["weight"].passed and report["bias"].passed
    assert report.worst().name == "input"


def test_catches_backward_that_overwrites_grads(backend):
    layer = on_backend(backend, LinearOverwritingGrads(3, 2, dtype="float64"), seed=1)
    report = check_layer(layer, random_array(backend, (4, 3)), eps=EPS, atol=ATOL, rtol=RTOL)
    assert not report.passed
    assert report["input"].passed
    assert report["weight"].accumulates is False and report["bias"].accumulates is False
    assert "overwrites" in report.table()


def test_catches_in_place_modification_of_arguments(backend):
    x = random_array(backend, (2, 3))
    report = check_layer(InPlaceForward(), x)
    assert not report.passed and report.problems == ["forward modified its input 0 in place"]
    assert "FAIL forward modified" in report.table()
    report = check_layer(InPlaceBackward(), x)
    assert not report.passed and report.problems == ["backward modified its grad_out argument in place"]
    assert report["input"].passed                                  # the gradient itself is right


def test_refuses_float32(backend):
    with pytest.raises(ValueError, match="float64"):
        check_layer(GELU(), random_array(backend, (2, 3)).astype("float32"))
    layer = Linear(3, 2, dtype="float32")
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data)
    with pytest.raises(ValueError, match="weight.*float64|float64.*weight"):
        check_layer(layer, random_array(backend, (2, 3)))


def test_refuses_nondeterministic_forward(backend):
    with pytest.raises(RuntimeError, match="not deterministic"):
        check_layer(Noisy(), random_array(backend, (2, 3)))


# ... and leave everything as it found it.

def test_restores_parameters_inputs_and_grads(backend):
    layer = on_backend(backend, MultiHeadSelfAttention(4, 2, dtype="float64"), seed=2)
    x = random_array(backend, (2, 3, 4))
    x_before = to_host(x).copy()
    data_before = {name: to_host(p.data).copy() for name, p in layer.named_parameters()}
    arrays_before = {name: p.data for name, p in layer.named_parameters()}
    for index, parameter in enumerate(layer.parameters()):
        parameter.grad[...] = index + 0.5                           # gradients accumulated earlier
    check(layer, x)
    np.testing.assert_array_equal(to_host(x), x_before)
    for name, parameter in layer.named_parameters():
        assert parameter.data is arrays_before[name]                # perturbed in place, same array
        np.testing.assert_array_equal(to_host(parameter.data), data_before[name])   # bit for bit
    for index, parameter in enumerate(layer.parameters()):
        np.testing.assert_array_equal(to_host(parameter.grad), index + 0.5)


class InterruptedLinear(Linear):
    """A Linear whose forward raises KeyboardInterrupt at call `at`: Ctrl-C in the middle of the
    central differences, while one weight is perturbed by ±eps."""

    def __init__(self, *args, at, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.at = 0, at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().forward(x)


# a (4, 3) input and Linear(3, 2): 2 forwards of set-up, then two per element: the 12 input elements
# (calls 3-26), the 6 weights (27-38), the 2 biases (39-42)
@pytest.mark.parametrize("at", [3, 27, 28, 40], ids=["input", "weight+eps", "weight-eps", "bias+eps"])
def test_an_exception_in_the_middle_of_the_check_leaves_every_value_as_it_was(backend, at):
    """check_layer interrupted inside its central differences, an element perturbed by +eps or -eps:
    that element is put back (the layer's weights bit for bit), the input untouched, the gradients
    restored, and the exception reaches the caller."""
    layer = on_backend(backend, InterruptedLinear(3, 2, dtype="float64", at=at), seed=1)
    x = random_array(backend, (4, 3))
    x_before = to_host(x).copy()
    data_before = {name: to_host(p.data).copy() for name, p in layer.named_parameters()}
    for index, parameter in enumerate(layer.parameters()):
        parameter.grad[...] = index + 0.5
    with pytest.raises(KeyboardInterrupt):
        check_layer(layer, x, eps=EPS, atol=ATOL, rtol=RTOL)
    assert layer.calls == at
    np.testing.assert_array_equal(to_host(x), x_before)
    for name, parameter in layer.named_parameters():
        np.testing.assert_array_equal(to_host(parameter.data), data_before[name], err_msg=name)
    for index, parameter in enumerate(layer.parameters()):
        np.testing.assert_array_equal(to_host(parameter.grad), index + 0.5)


def test_holds_dropout_mask_during_check_and_releases_it(backend):
    layer = Dropout(0.5, seed=0)                                    # mask not fixed by the caller
    check(layer, random_array(backend, (3, 4)))
    assert layer.mask_fixed is False
    layer.fix_mask()
    check(layer, random_array(backend, (3, 4)))
    assert layer.mask_fixed is True


def test_report_api(backend):
    layer = on_backend(backend, Linear(3, 2, dtype="float64"), seed=0)
    report = check(layer, random_array(backend, (4, 3)), title="my linear")
    assert len(report) == 3 and [c.name for c in report] == ["input", "weight", "bias"]
    weight = report["weight"]
    assert isinstance(weight, TensorCheck) and weight.shape == (3, 2) and weight.passed
    assert weight.max_abs_error <= ATOL and weight.max_abs_numeric > 0 and weight.accumulates is True
    np.testing.assert_allclose(weight.analytic, weight.numeric, rtol=RTOL, atol=ATOL)
    assert report.worst() in report.checks and report.failures() == []
    text = str(report)
    assert text == report.table() and "my linear" in text and "PASSED" in text
    lines = text.splitlines()
    assert all(name in text for name in ("input", "weight", "bias"))
    assert len({line.index("(") for line in lines[3:]}) == 1        # the shape column is aligned
    with pytest.raises(KeyError):
        report["nope"]
    assert format_table(("a", "bb"), [("xxx", "y")]).splitlines()[0] == "a    bb"
