"""The one dispatch point between a formula and its GPU twin (scratchvit/twins.py, layers/layer.py).

Runs without a GPU: a stand-in array type (a NumPy subclass) plays the device array, as in
tests/test_layer_properties.py::test_a_layer_refuses_an_input_on_another_device, and stand-in twins
record that they were called. Also here: no forward/backward body under scratchvit/layers/ (nor the
optimiser's, the weight average's or shift_images') holds a device branch, read from their syntax trees;
`Layer.device` and `Layer.evaluating()`.
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
