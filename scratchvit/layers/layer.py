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
"""
import contextlib

from ..backend import get_array_module, get_backend, is_gpu_array


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


class Layer:
    """Base class: parameter discovery, zero_grad, and train/eval mode."""

    training = True

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
