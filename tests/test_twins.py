"""The one dispatch point between a formula and its GPU twin (scratchvit/twins.py, layers/layer.py).

Runs without a GPU: a stand-in array type (a NumPy subclass) plays the device array, as in
tests/test_layer_properties.py::test_a_layer_refuses_an_input_on_another_device, and stand-in twins
record that they were called. Also here: every twin takes its formula's arguments; no forward/backward
body under scratchvit/layers/ (nor the optimiser's, the weight average's or shift_images') holds a device
branch, read from their syntax trees; `Layer.device` and `Layer.evaluating()`; and the layer twins' own
steps, run on a CPU with their kernels computed by NumPy (tests/test_kernels.py holds the kernels
themselves against NumPy on a GPU).
"""
import ast
import inspect
import pathlib

import numpy
import pytest

import scratchvit
from scratchvit import twins
from scratchvit.layers import GELU, Dropout, Layer, Linear, Parameter
from scratchvit.layers import layer as layer_module
from scratchvit.twins import dispatched, register_gpu_twin
from scratchvit.vit import ViT


class _StandInDeviceArray(numpy.ndarray):
    """A NumPy array that the patched `is_gpu_array` calls a device array."""


def _on_stand_in_device(array):
    return numpy.asarray(array).view(_StandInDeviceArray)


@pytest.fixture
def stand_in_device(monkeypatch):
    """is_gpu_array of the dispatchers answers True for stand-in arrays only."""
    def is_stand_in(array):
        return isinstance(array, _StandInDeviceArray)
    monkeypatch.setattr(layer_module, "is_gpu_array", is_stand_in)
    monkeypatch.setattr(twins, "is_gpu_array", is_stand_in)


class _Doubling(Layer):
    """y = 2 x, without parameters."""

    def forward(self, x):
        return x * 2.0

    def backward(self, grad_out):
        return grad_out * 2.0


class _Scaling(Layer):
    """y = w * x, w a parameter."""

    def __init__(self):
        self.weight = Parameter(numpy.array([3.0]))

    def forward(self, x):
        return x * self.weight.data

    def backward(self, grad_out):
        return grad_out * self.weight.data


@dispatched(lambda x, divisor=2.0: x)
def _halve(x, divisor=2.0):
    return x / divisor


@pytest.fixture
def twin_calls():
    """Stand-in twins registered for _Doubling, _Scaling and _halve; yields the list of their calls."""
    calls = []

    def twin(name):
        def record(*arguments, **options):
            calls.append((name, arguments[1:] if name != "halve" else arguments))
            return name
        return record
    targets = [(_Doubling.forward, "doubling.forward"), (_Doubling.backward, "doubling.backward"),
               (_Scaling.forward, "scaling.forward"), (_Scaling.backward, "scaling.backward"), (_halve, "halve")]
    for target, name in targets:
        register_gpu_twin(target)(twin(name))
    yield calls
    for target, _ in targets:
        twins.GPU_TWINS.pop(target)
    twins.TWINNED_LAYERS.difference_update({_Doubling, _Scaling})


def test_a_layer_without_parameters_goes_where_its_input_is_and_backward_follows_forward(stand_in_device,
                                                                                          twin_calls):
    """Forward on a device array goes to the twin; backward with a Python number goes where forward went
    (never judged by the number); after a forward on a host array both run the formula."""
    layer = _Doubling()
    x = _on_stand_in_device([1.0, 2.0])
    assert layer.forward(x) == "doubling.forward"
    assert layer.backward(0.5) == "doubling.backward"
    assert [name for name, _ in twin_calls] == ["doubling.forward", "doubling.backward"]
    assert twin_calls[1][1] == (0.5,)
    numpy.testing.assert_array_equal(layer.forward(numpy.array([1.0, 2.0])), [2.0, 4.0])
    assert layer.backward(0.5) == 1.0                               # the formula: forward went to the host
    assert len(twin_calls) == 2


def test_a_layer_with_parameters_goes_where_its_parameters_are(stand_in_device, twin_calls):
    """The parameters decide, not the input: a device input to a layer with host parameters runs the
    formula (where the real layers refuse it, check_same_device), parameters on the device send a
    device input to the twin, and backward follows forward."""
    layer = _Scaling()
    assert layer.device == "cpu"
    numpy.testing.assert_array_equal(layer.forward(_on_stand_in_device([1.0])), [3.0])
    assert twin_calls == []
    assert layer.backward(numpy.array([1.0])) == numpy.array([3.0])
    layer.weight.data = _on_stand_in_device(layer.weight.data)
    assert layer.device == "gpu"
    assert layer.forward(_on_stand_in_device([1.0])) == "scaling.forward"
    assert layer.backward(2.0) == "scaling.backward"
    assert [name for name, _ in twin_calls] == ["scaling.forward", "scaling.backward"]


def test_a_host_input_runs_the_formula_which_refuses_it_for_parameters_on_the_device(stand_in_device):
    """A NumPy input never reaches a twin: a layer whose parameters are on the device refuses it in its
    formula, in one line, as its twin would."""
    from scratchvit.layers import LayerNorm
    layer = LayerNorm(4, dtype="float64")
    for parameter in layer.parameters():
        parameter.data = _on_stand_in_device(parameter.data)
    with pytest.raises(ValueError, match=r"^LayerNorm: the input is on the CPU"):
        layer.forward(numpy.ones((2, 4)))


def test_a_dispatched_function_goes_where_its_array_is(stand_in_device, twin_calls):
    """Judged by the array its device_of picks, with the arguments given by position or by name."""
    assert _halve(numpy.array([4.0])) == numpy.array([2.0])
    assert _halve(x=numpy.array([4.0]), divisor=4.0) == numpy.array([1.0])
    assert _halve(_on_stand_in_device([4.0])) == "halve"
    assert _halve(x=_on_stand_in_device([4.0]), divisor=4.0) == "halve"
    assert [name for name, _ in twin_calls] == ["halve", "halve"]


def test_a_layer_class_without_twins_runs_its_formula_even_on_the_device(stand_in_device, twin_calls):
    class Tripling(Layer):
        def forward(self, x):
            return x * 3.0

        def backward(self, grad_out):
            return grad_out * 3.0
    layer = Tripling()
    numpy.testing.assert_array_equal(layer.forward(_on_stand_in_device([1.0])), [3.0])
    assert layer.backward(1.0) == 3.0 and twin_calls == []


def test_only_a_dispatching_function_can_have_a_twin():
    def plain(x):
        return x
    with pytest.raises(TypeError, match="cannot have a GPU twin"):
        register_gpu_twin(plain)
    with pytest.raises(TypeError, match="cannot have a GPU twin"):
        register_gpu_twin(Layer.zero_grad)


def test_every_gpu_twin_of_the_package_is_registered():
    """Importing scratchvit registers one twin for each formula that has a kernel."""
    from scratchvit import data
    from scratchvit.layers import LayerNorm, MultiHeadSelfAttention, SoftmaxCrossEntropy, softmax, softmax_backward
    from scratchvit.optim import AdamW
    from scratchvit.weight_average import WeightAverage
    expected = [GELU.forward, GELU.backward, LayerNorm.forward, LayerNorm.backward, Linear.backward,
                MultiHeadSelfAttention.forward, MultiHeadSelfAttention.backward, Dropout.forward, Dropout.forward_add,
                SoftmaxCrossEntropy.forward, SoftmaxCrossEntropy.backward, softmax, softmax_backward,
                AdamW.apply_step, AdamW.grad_norm, AdamW.scale_to_max_norm, WeightAverage.move_towards_weights,
                data.shift_images]
    for target in expected:
        assert target in twins.GPU_TWINS, target.__qualname__
    assert len(twins.GPU_TWINS) == len(expected)


def test_every_gpu_twin_takes_the_arguments_of_its_formula():
    """A twin is called with the formula's arguments: the same parameters, kinds and defaults (the first,
    self, may have another name), so a call that omits a default works on both devices."""
    for target, twin in twins.GPU_TWINS.items():
        formula = inspect.signature(target.__wrapped__).parameters.values()
        standing_in = inspect.signature(twin).parameters.values()
        described = [[(parameter.kind, parameter.default) for parameter in parameters]
                     for parameters in (formula, standing_in)]
        assert described[0] == described[1], target.__qualname__
        names = [[parameter.name for parameter in parameters] for parameters in (formula, standing_in)]
        first = 1 if "." in target.__qualname__ else 0          # a method's self
        assert names[0][first:] == names[1][first:], target.__qualname__


# ---------------------------------------------------------------------------------------------------
# No device branch in a formula's body
# ---------------------------------------------------------------------------------------------------

PACKAGE = pathlib.Path(scratchvit.__file__).parent
# (file, the functions or methods whose bodies must not choose a device: "all" of them in a math file under
# layers/, which only layer.py may let name the GPU; "passes": every forward, forward_* and backward)
FORMULA_BODIES = [(path, "all") for path in sorted((PACKAGE / "layers").glob("*.py"))
                  if path.name not in ("layer.py", "__init__.py")]
FORMULA_BODIES += [(PACKAGE / "optim.py", {"step", "apply_step", "grad_norm", "clip_grad_norm", "scale_to_max_norm"}),
                   (PACKAGE / "weight_average.py", {"update", "move_towards_weights"}),
                   (PACKAGE / "data.py", {"shift_images"}),
                   (PACKAGE / "encoder_block.py", "passes"), (PACKAGE / "vit.py", "passes")]


def _device_branches(function):
    """Names in `function`'s body that choose a device: calls of is_gpu_array or get_backend, or any name
    or attribute that mentions cupy or gpu."""
    found = []
    for node in ast.walk(function):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name and (name in ("is_gpu_array", "get_backend") or "cupy" in name.lower() or "gpu" in name.lower()):
            found.append(f"{function.name}:{node.lineno}: {name}")
    return found


def _formula_functions(source, names):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_pass = node.name in ("forward", "backward") or node.name.startswith("forward_")
            if names == "all" or (names == "passes" and is_pass) or (isinstance(names, set) and node.name in names):
                yield node


@pytest.mark.parametrize("path,names", FORMULA_BODIES, ids=lambda value: getattr(value, "name", None) or str(value))
def test_no_formula_body_holds_a_device_branch(path, names):
    functions = list(_formula_functions(path.read_text(), names))
    assert functions, f"{path.name}: none of the functions looked for"
    branches = [branch for function in functions for branch in _device_branches(function)]
    assert branches == [], f"{path.name}: device branches in formula bodies: {branches}"


def test_the_device_branch_check_sees_a_branch():
    """The check itself, on a body that holds each kind of branch and on one that holds none."""
    source = ("def forward(self, x):\n    if is_gpu_array(x):\n        return self.twin(x)\n    return x\n"
              "def backward(self, g):\n    import cupy\n    return cupy.asarray(g)\n"
              "def forward_add(self, x, r):\n    return x + r\n")
    found = {function.name: _device_branches(function) for function in _formula_functions(source, "passes")}
    assert found["forward"] and found["backward"] and found["forward_add"] == []


# ---------------------------------------------------------------------------------------------------
# Layer.device and Layer.evaluating()
# ---------------------------------------------------------------------------------------------------

def _small_vit():
    return ViT(image_size=4, patch_size=2, num_classes=3, dim=4, depth=2, heads=2, mlp_dim=8, dropout=0.2,
               emb_dropout=0.2, dtype="float64")


def test_device_is_where_the_first_parameter_lives(stand_in_device):
    assert GELU().device is None and Dropout(0.1).device is None
    model = _small_vit()
    assert model.device == "cpu" and model.blocks[0].attn.device == "cpu"
    for parameter in model.parameters():
        parameter.data = _on_stand_in_device(parameter.data)
    assert model.device == "gpu" and model.blocks[0].attn.device == "gpu"


def test_evaluating_sets_eval_mode_and_restores_each_layers_mode_also_on_an_exception():
    model = _small_vit()
    model.blocks[1].train(False)                      # a mixed state: block 1 already in eval mode
    before = [layer.training for layer in model.layers()]
    assert True in before and False in before
    with model.evaluating() as same:
        assert same is model
        assert not any(layer.training for layer in model.layers())
    assert [layer.training for layer in model.layers()] == before
    with pytest.raises(RuntimeError, match="inside"):
        with model.evaluating():
            raise RuntimeError("inside")
    assert [layer.training for layer in model.layers()] == before


# ---------------------------------------------------------------------------------------------------
# The twins' own steps, run without a GPU: their kernels replaced by the formulas on the host
# ---------------------------------------------------------------------------------------------------

def _host(array):
    return numpy.asarray(array).view(numpy.ndarray)


def _numpy_kernels(monkeypatch):
    """Each kernel wrapper a twin calls, replaced by its formula run by NumPy on the stand-in's data (the
    formula bodies, `__wrapped__`, past the dispatch); returns the set of the kernels called."""
    from scratchvit import kernels
    from scratchvit.layers import LayerNorm, SoftmaxCrossEntropy, softmax, softmax_backward
    called = set()

    def kernel(module, name):
        def replace(function):
            def record(*arguments, **options):
                called.add(name)
                return function(*arguments, **options)
            monkeypatch.setattr(module, name, record)
        return replace

    @kernel(kernels.gelu, "gelu_forward")
    def _(x):
        layer = GELU()
        return _on_stand_in_device(GELU.forward.__wrapped__(layer, _host(x))), _on_stand_in_device(layer.t)

    @kernel(kernels.gelu, "gelu_backward")
    def _(x, t, grad_out):
        layer = GELU()
        layer.x, layer.t = _host(x), _host(t)
        return _on_stand_in_device(GELU.backward.__wrapped__(layer, grad_out))

    @kernel(kernels.layernorm, "layernorm_forward")
    def _(x, gamma, beta, eps):
        layer = LayerNorm(x.shape[-1], eps, dtype=x.dtype)
        layer.weight.data[...], layer.bias.data[...] = _host(gamma), _host(beta)
        y = LayerNorm.forward.__wrapped__(layer, _host(x))
        return tuple(_on_stand_in_device(array) for array in (y, layer.xhat, layer.rstd))

    @kernel(kernels.layernorm, "layernorm_backward")
    def _(grad_out, xhat, rstd, gamma):
        layer = LayerNorm(grad_out.shape[-1], dtype=grad_out.dtype)
        layer.weight.data[...], layer.xhat, layer.rstd = _host(gamma), _host(xhat), _host(rstd)
        grad_x = LayerNorm.backward.__wrapped__(layer, _host(grad_out))
        return tuple(_on_stand_in_device(array) for array in (grad_x, layer.weight.grad, layer.bias.grad))

    kernel(kernels.softmax, "softmax_forward")(lambda scores: softmax.__wrapped__(scores))
    kernel(kernels.softmax, "softmax_backward")(lambda probs, grad: softmax_backward.__wrapped__(probs, grad))

    @kernel(kernels.attention, "split_qkv")
    def _(qkv, heads, scale):
        B, T, three_dim = qkv.shape
        q, k, v = qkv.reshape(B, T, 3, heads, three_dim // (3 * heads)).transpose(2, 0, 3, 1, 4)
        k, v = numpy.ascontiguousarray(k), numpy.ascontiguousarray(v)
        return (q * scale, k, v, numpy.ascontiguousarray(k.transpose(0, 1, 3, 2)),
                numpy.ascontiguousarray(v.transpose(0, 1, 3, 2)))

    @kernel(kernels.attention, "merge_grad_qkv")
    def _(grad_heads, scale):
        grad_heads = grad_heads.copy()
        grad_heads[0] *= scale
        _, B, H, T, d = grad_heads.shape
        return grad_heads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * d)

    kernel(kernels.attention, "transposed_product")(lambda a, b, out: numpy.matmul(a.swapaxes(-1, -2), b, out=out))
    monkeypatch.setattr(kernels.attention, "cupy_module", lambda: numpy)

    @kernel(kernels.linear, "add_transposed_product")
    def _(a, b, out):
        out += a.T @ b
        return out

    def dropout_mask(x, p, generator):
        return (generator.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype) * (1.0 / (1.0 - p))

    @kernel(kernels.dropout, "dropout_forward")
    def _(x, p, generator):
        mask = dropout_mask(x, p, generator)
        return x * mask, mask

    @kernel(kernels.dropout, "add_dropout_forward")
    def _(residual, x, p, generator):
        mask = dropout_mask(x, p, generator)
        return residual + x * mask, mask

    kernel(kernels.dropout, "add_dropout")(lambda residual, x, mask: residual + x * mask)

    @kernel(kernels.cross_entropy, "cross_entropy_forward")
    def _(logits, labels, smoothing):
        layer = SoftmaxCrossEntropy(smoothing)
        loss = SoftmaxCrossEntropy.forward.__wrapped__(layer, _host(logits), _host(labels))
        return _on_stand_in_device(loss), _on_stand_in_device(layer.probs)

    @kernel(kernels.cross_entropy, "cross_entropy_backward")
    def _(probs, labels, smoothing, grad_loss):
        layer = SoftmaxCrossEntropy(smoothing)
        layer.probs, layer.labels = _host(probs).copy(), _host(labels)
        return _on_stand_in_device(SoftmaxCrossEntropy.backward.__wrapped__(layer, grad_loss))
    return called


@pytest.mark.parametrize("dropout,training", [(0.0, True), (0.2, True), (0.2, False)])
def test_the_layer_twins_steps_give_the_formulas_results(stand_in_device, monkeypatch, dropout, training):
    """An EncoderBlock and the loss on the stand-in device run every layer twin's own steps (what each
    stores for backward, the order of its kernels), the kernels computed by NumPy: output, input gradient
    and parameter gradients equal those of a host twin block to rounding, and every kernel is called."""
    from scratchvit.encoder_block import EncoderBlock
    from scratchvit.layers import SoftmaxCrossEntropy
    called = _numpy_kernels(monkeypatch)

    def build():
        return EncoderBlock(16, 2, 24, dropout=dropout, dtype="float64", rng=numpy.random.default_rng(1),
                            dropout_seeds=(3, 4, 5)).train(training)
    on_host, on_device = build(), build()
    for parameter in on_device.parameters():
        parameter.data = _on_stand_in_device(parameter.data)
    rng = numpy.random.default_rng(2)
    x, grad_out = rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 9, 16))
    expected = [on_host.forward(x.copy()), on_host.backward(grad_out.copy())]
    actual = [on_device.forward(_on_stand_in_device(x)), on_device.backward(_on_stand_in_device(grad_out))]
    assert all(isinstance(value, _StandInDeviceArray) for value in actual)
    expected += [parameter.grad for parameter in on_host.parameters()]
    actual += [parameter.grad for parameter in on_device.parameters()]
    for value, reference in zip(actual, expected):
        numpy.testing.assert_allclose(_host(value), reference, rtol=1e-12, atol=1e-12)
    loss_on_device, loss_on_host = SoftmaxCrossEntropy(0.1), SoftmaxCrossEntropy(0.1)
    logits, labels = rng.standard_normal((4, 5)), numpy.array([0, 1, 4, 2])
    loss_on_device.forward(_on_stand_in_device(logits), _on_stand_in_device(labels))
    loss_on_host.forward(logits, labels)
    numpy.testing.assert_allclose(_host(loss_on_device.backward(0.5)), loss_on_host.backward(0.5), rtol=1e-12)
    gelu, gelu_on_host = GELU(), GELU()                  # a 0-d output: backward's argument is a number
    gelu.forward(_on_stand_in_device(0.7))
    gelu_on_host.forward(numpy.array(0.7))
    assert float(gelu.backward(0.5)) == pytest.approx(float(gelu_on_host.backward(0.5)), rel=1e-12)
    kernels_used = {"gelu_forward", "gelu_backward", "layernorm_forward", "layernorm_backward", "softmax_forward",
                    "softmax_backward", "split_qkv", "merge_grad_qkv", "transposed_product", "add_transposed_product",
                    "cross_entropy_forward", "cross_entropy_backward"}
    if dropout and training:
        kernels_used |= {"dropout_forward", "add_dropout_forward"}
    assert called == kernels_used
