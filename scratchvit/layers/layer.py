"""Parameter and Layer: the two pieces every layer is built from.

A `Parameter` is a learnable array `.data` with its gradient `.grad` (same shape, dtype, device).

A `Layer` has `forward(...)`, which returns its output and keeps exactly what the backward pass
needs, and `backward(grad_out)`, which returns the gradient with respect to its input.

The one accumulation rule, used by every layer in this package:

    backward ADDS into parameter gradients (`param.grad += ...`); `zero_grad()` clears them.

so a parameter used twice, or gradients summed over several batches, come out right.

Sub-layers and parameters are found by walking the layer's attributes in the order they were
set, lists of layers included, which gives stable dotted names such as `blocks.0.attn.qkv.weight`.

Devices. A layer's parameters are created on the host; `layer.to("gpu")` moves them, and the layer
then computes on that device. Every layer takes its device (its array module, and whether to use a
GPU kernel) from the arrays it owns: its parameters, or what its forward kept. Never from
`backward`'s argument, which may be a Python number (the upstream gradient of a scalar output).
An input on another device than the layer's parameters is refused with a one-line ValueError
(`check_same_device`) instead of failing deep inside NumPy or CuPy.

GPU twins: this is the one place under layers/ that knows of the GPU. A layer file writes `forward`
and `backward` once, on the array module. A CuPy kernel that computes the same steps registers as the
twin of a method (scratchvit/twins.py, `register_gpu_twin(GELU.forward)`, from scratchvit/kernels/).
`Layer.__init_subclass__` wraps each subclass's own `forward`, `forward_*` and `backward`: a forward
of a layer class that has twins records whether the layer computes on the GPU (its parameters' device,
`Layer.device`, or for a layer without parameters the device of the array it received), and calls the
twin if so; backward goes where that forward went, whatever its argument. A NumPy input goes to the
formula without a look at the parameters: if they are on the GPU, the formula refuses the input
(check_same_device) as the twin would. So on the CPU a call costs a set look-up and a type test.
"""
import contextlib
import functools

import numpy

from ..backend import get_array_module, get_backend, is_gpu_array
from ..twins import GPU_TWINS, TWINNED_LAYERS, dispatched

__all__ = ["Layer", "Parameter", "check_same_device", "dispatched"]


def check_same_device(layer_name, x, parameter):
    """ValueError, one line, unless the array x is on the device of `parameter` (a Parameter).

    Costs one type comparison when x and the parameter are of one array type (the normal case)."""
    if type(x) is not type(parameter.data) and is_gpu_array(x) != is_gpu_array(parameter.data):
        where = {True: "the GPU (a CuPy array)", False: "the CPU (a NumPy array)"}
        raise ValueError(f"{layer_name}: the input is on {where[is_gpu_array(x)]} but the layer's parameters "
                         f"are on {where[is_gpu_array(parameter.data)]}; move the layer with "
                         f".to(\"{'gpu' if is_gpu_array(x) else 'cpu'}\") (as a model is moved)")


class Parameter:
    """A learnable array and its gradient.

    `.data` may be reassigned; if the new array differs in shape, dtype or device, `.grad` is
    replaced by zeros that match it, so `.data` and `.grad` always agree.
    """

    def __init__(self, data):
        self._data = data
        self.grad = get_array_module(data).zeros_like(data)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        grad = self.grad
        if (value.shape != grad.shape or value.dtype != grad.dtype
                or get_array_module(value) is not get_array_module(grad)):
            self.grad = get_array_module(value).zeros_like(value)
        self._data = value

    @property
    def shape(self):
        return self._data.shape

    @property
    def size(self):
        return self._data.size

    def __repr__(self):
        return f"Parameter(shape={self._data.shape}, dtype={self._data.dtype})"


def _dispatching(layer_class, method):
    """`method` of `layer_class`, sent to its GPU twin when the layer computes on the GPU (module docstring)."""
    if method.__name__ == "backward":
        @functools.wraps(method)
        def dispatching(self, *arguments, **options):
            if layer_class in TWINNED_LAYERS and self.__dict__.get("_forward_on_gpu", False):
                twin = GPU_TWINS.get(dispatching)
                if twin is not None:
                    return twin(self, *arguments, **options)
            return method(self, *arguments, **options)
    else:
        @functools.wraps(method)
        def dispatching(self, *arguments, **options):
            if layer_class in TWINNED_LAYERS:
                x = arguments[0]
                if type(x) is numpy.ndarray:             # a host input: the formula (module docstring)
                    on_gpu = False
                else:                                    # the input decides only for a layer without parameters
                    device = self.device
                    on_gpu = is_gpu_array(x) if device is None else device == "gpu"
                self._forward_on_gpu = on_gpu            # where backward goes
                if on_gpu:
                    twin = GPU_TWINS.get(dispatching)
                    if twin is not None:
                        return twin(self, *arguments, **options)
            return method(self, *arguments, **options)
    dispatching.dispatches_to_gpu_twin = True
    dispatching.layer_class = layer_class
    return dispatching


class Layer:
    """Base class: parameter discovery, zero_grad, train/eval mode, and the dispatch to GPU twins."""

    training = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if callable(value) and (name in ("forward", "backward") or name.startswith("forward_")):
                setattr(cls, name, _dispatching(cls, value))

    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    def __call__(self, *inputs):
        return self.forward(*inputs)

    def named_children(self):
        """(name, layer) for every direct sub-layer, lists of layers as name.0, name.1, ..."""
        for name, value in vars(self).items():
            if isinstance(value, Layer):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if isinstance(item, Layer):
                        yield f"{name}.{index}", item

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) for this layer's parameters, then its sub-layers', in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self):
        return [parameter for _, parameter in self.named_parameters()]

    def layers(self):
        """This layer and every sub-layer, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.layers()

    def zero_grad(self):
        for parameter in self.parameters():
            parameter.grad.fill(0)

    def train(self, mode=True):
        for layer in self.layers():
            layer.training = mode
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode for the body of a `with` block, then each layer's mode as it was, also when the body
        raises: how evaluation, the report and the attention maps run a model that may be training."""
        modes = [(layer, layer.training) for layer in self.layers()]
        self.eval()
        try:
            yield self
        finally:
            for layer, training in modes:
                layer.training = training

    def to(self, device):
        """Move every parameter to "cpu" or "gpu" (or a Backend); a parameter that changes device gets zero
        gradients. The layer then computes on that device: this is how a model, or a layer alone, is moved."""
        backend = get_backend(device)
        for parameter in self.parameters():
            parameter.data = backend.asarray(parameter.data)
        return self

    @property
    def device(self):
        """"cpu" or "gpu", where the layer's first parameter lives (so where it computes); None for a
        layer without parameters, which computes where its input lives."""
        for _, parameter in self.named_parameters():
            return "gpu" if is_gpu_array(parameter.data) else "cpu"
        return None
