"""GPU twins: the one registry that sends a call to a CuPy kernel or to the formula it stands in for.

A formula is written once, on the array module, in its own file (a layer's forward and backward, the
optimiser's step, the weight average's update, the image shift). Where a CuPy kernel computes the same
formula in fewer launches, its wrapper lives in scratchvit/kernels/ and registers itself as the formula's
GPU twin, a function taking the same arguments:

    @register_gpu_twin(GELU.forward)            # in scratchvit/kernels/gelu.py
    def forward_on_gpu(layer, x): ...

A call then goes to the twin when the work is on the GPU, else to the formula. Who decides "on the GPU":
- a Layer's forward, forward_* and backward methods: layers/layer.py (`Layer.__init_subclass__`), by
  the layer's parameters, or, without parameters, by the array forward received; backward goes where
  forward went (its argument may be a Python number);
- any other function or method marked `@dispatched(device_of)`: the device of the array that
  `device_of`, given the call's arguments (so it has the function's signature), returns (AdamW's flat buffers, the averaged weights, the images).
Importing scratchvit.kernels (scratchvit/__init__.py does) fills the registry; CuPy itself is imported
only when a kernel first runs. Kernel modules import the formulas' modules, never the reverse.
"""
import functools

from .backend import is_gpu_array

GPU_TWINS = {}            # dispatching function -> its GPU twin (a function of the same arguments)
TWINNED_LAYERS = set()    # Layer classes with at least one twin: only their forwards record a device


def register_gpu_twin(target):
    """Decorator: the decorated function is the GPU twin of `target`, a Layer method or a function
    marked @dispatched, and is called in its place when the work is on the GPU."""
    if not getattr(target, "dispatches_to_gpu_twin", False):
        raise TypeError(f"{getattr(target, '__qualname__', target)!r} cannot have a GPU twin: it is neither a "
                        f"Layer's forward/backward nor marked @dispatched")

    def register(twin):
        GPU_TWINS[target] = twin
        if target.layer_class is not None:
            TWINNED_LAYERS.add(target.layer_class)
        return twin
    return register


def dispatched(device_of):
    """Decorator for a function (or a method of a class that is not a Layer) that may have a GPU twin:
    a call goes to the twin when `device_of(*arguments, **options)`, a function with the same signature,
    returns a CuPy array, else to the function."""
    def decorate(function):
        @functools.wraps(function)
        def dispatching(*arguments, **options):
            twin = GPU_TWINS.get(dispatching)
            if twin is not None and is_gpu_array(device_of(*arguments, **options)):
                return twin(*arguments, **options)
            return function(*arguments, **options)
        dispatching.dispatches_to_gpu_twin = True
        dispatching.layer_class = None
        return dispatching
    return decorate
