"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization") over one flat buffer.

For every parameter element theta with gradient g, at step t (starting at 1):
    m = beta1 * m + (1 - beta1) * g                 first moment (running mean of g)
    v = beta2 * v + (1 - beta2) * g^2               second moment (running mean of g^2)
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)       bias corrections
    theta = theta - lr * weight_decay * theta                   decoupled decay: not mixed into g
    theta = theta - lr * m_hat / (sqrt(v_hat) + eps)
This is exactly torch.optim.AdamW.

Flat buffer: at construction every parameter's data and gradient are copied into two flat arrays
and the parameters' `.data` / `.grad` become views into them. Then one step is a few array
operations over all parameters at once (one kernel on the GPU: kernels/adamw.py), the gradient norm is one
dot product, and zeroing the gradients is one fill. Layers keep writing `param.grad += ...` into
their views. If a parameter's `.data` is later replaced by a new array, the next step copies it
back into the flat buffer and makes it a view again.

Learning-rate schedule: either set `optimizer.lr` before each step, or give the whole schedule once
with `set_schedule(learning_rates)`: step t (counting from 1) then uses learning_rates[t - 1].

Parameter groups: `params` is either a list of Parameters or a list of dicts
`{"params": [...], "weight_decay": wd}` (groups without "weight_decay" use the default), for
example to skip weight decay on biases, LayerNorm parameters and embeddings.
"""
import math

from .backend import get_array_module, is_gpu_array, to_host
from .kernels import adamw as adamw_kernels
from .twins import dispatched, register_gpu_twin

CLIP_EPS = 1e-6   # clip_grad_norm scales by max_norm / (norm + CLIP_EPS), as torch.nn.utils.clip_grad_norm_


class AdamW:
    clip_eps = CLIP_EPS      # clip_grad_norm's eps, read by its GPU twin too

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not lr >= 0.0:
            raise ValueError(f"lr must be non-negative, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.parameters, decay_per_parameter = [], []
        for group in groups:
            unknown = sorted(set(group) - {"params", "weight_decay"})
            if unknown:
                raise ValueError(f"AdamW parameter groups take 'params' and 'weight_decay' only, got {unknown[0]!r}")
            group_decay = float(group.get("weight_decay", weight_decay))
            if not group_decay >= 0.0:
                raise ValueError(f"a parameter group's weight_decay must be non-negative, got {group_decay!r}")
            for parameter in group["params"]:
                self.parameters.append(parameter)
                decay_per_parameter.append(group_decay)
        if not self.parameters:
            raise ValueError("AdamW got no parameters to optimise")
        if len({id(p) for p in self.parameters}) != len(self.parameters):
            raise ValueError("a parameter appears twice in AdamW's parameter list")
        first = self.parameters[0].data
        xp = get_array_module(first)
        dtype = first.dtype
        total = sum(p.size for p in self.parameters)
        self.data = xp.empty(total, dtype=dtype)
        self.grad = xp.zeros(total, dtype=dtype)
        self.exp_avg = xp.zeros(total, dtype=dtype)        # m
        self.exp_avg_sq = xp.zeros(total, dtype=dtype)     # v
        self.step_count = 0
        self.data_views, self.grad_views, offset = [], [], 0
        decay_runs = []
        for parameter, decay in zip(self.parameters, decay_per_parameter):
            if parameter.data.dtype != dtype or get_array_module(parameter.data) is not xp:
                raise ValueError("all parameters given to AdamW must share one dtype and one device")
            end = offset + parameter.size
            data_view = self.data[offset:end].reshape(parameter.shape)
            grad_view = self.grad[offset:end].reshape(parameter.shape)
            data_view[...] = parameter.data
            grad_view[...] = parameter.grad
            parameter.data, parameter.grad = data_view, grad_view
            self.data_views.append(data_view)
            self.grad_views.append(grad_view)
            decay_runs.append((offset, end, decay))
            offset = end
        # decoupled weight decay as one multiplier per element: 1 where decayed, 0 where not
        decays = {decay for _, _, decay in decay_runs}
        if len(decays) == 1:
            self.weight_decay, self.decay_mask = decays.pop(), None
        else:
            self.weight_decay = max(decays)
            self.decay_mask = xp.zeros(total, dtype=dtype)
            for start, end, decay in decay_runs:
                self.decay_mask[start:end] = decay / self.weight_decay    # weight_decay > 0: the decays differ
        # scratch space for the CPU step, reused every step (the GPU step is one fused kernel)
        self.update = None if is_gpu_array(self.data) else xp.empty(total, dtype=dtype)
        self.learning_rates = None     # set_schedule: the lr of every step

    def set_schedule(self, learning_rates):
        """From now on step t (counting from 1) uses learning_rates[t - 1], and the last entry after the
        table ends; `lr` follows."""

        learning_rates = [float(lr) for lr in learning_rates]
        if not learning_rates or not all(lr >= 0.0 for lr in learning_rates):
            raise ValueError("set_schedule needs a non-empty list of non-negative learning rates")
        self.learning_rates = learning_rates

    def _count_step(self):
        self.step_count += 1
        if self.learning_rates is not None:
            self.lr = self.learning_rates[min(self.step_count, len(self.learning_rates)) - 1]

    def zero_grad(self):
        self.grad.fill(0)

    @dispatched(lambda optimizer: optimizer.grad)
    def grad_norm(self):
        """The global L2 norm of all gradients, as a 0-d array (no host synchronisation)."""
        xp = get_array_module(self.grad)
        return xp.sqrt(xp.dot(self.grad, self.grad))

    def clip_grad_norm(self, max_norm):
        """Scale all gradients so their global norm is at most max_norm; returns the norm before clipping."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm!r}")
        norm = self.grad_norm()
        self.scale_to_max_norm(norm, max_norm)
        return norm

    @dispatched(lambda optimizer, norm, max_norm: optimizer.grad)
    def scale_to_max_norm(self, norm, max_norm):
        """grad *= minimum(1, max_norm / (norm + CLIP_EPS)), norm the 0-d array grad_norm gave."""
        xp = get_array_module(self.grad)
        self.grad *= xp.minimum(1.0, max_norm / (norm + CLIP_EPS)).astype(self.grad.dtype)

    def _resync_replaced_parameters(self):
        for index, parameter in enumerate(self.parameters):
            if parameter.shape != self.data_views[index].shape:
                raise ValueError(f"a parameter's data was replaced by an array of shape {parameter.shape}, but "
                                 f"AdamW optimises it with shape {self.data_views[index].shape}")
            if parameter.data is not self.data_views[index]:
                self.data_views[index][...] = parameter.data
                parameter.data = self.data_views[index]
            if parameter.grad is not self.grad_views[index]:
                self.grad_views[index][...] = parameter.grad
                parameter.grad = self.grad_views[index]

    def step(self):
        self._resync_replaced_parameters()
        self._count_step()
        beta1, beta2 = self.betas
        self.apply_step(1.0 - beta1 ** self.step_count, 1.0 - beta2 ** self.step_count)

    @dispatched(lambda optimizer, bias_correction1, bias_correction2: optimizer.data)
    def apply_step(self, bias_correction1, bias_correction2):
        """The update of the module docstring for the step already counted, bc1 and bc2 its bias corrections."""
        xp = get_array_module(self.data)
        beta1, beta2 = self.betas
        g, m, v, update = self.grad, self.exp_avg, self.exp_avg_sq, self.update
        # m = beta1 m + (1 - beta1) g
        m *= beta1
        xp.multiply(g, 1.0 - beta1, out=update)
        m += update
        # v = beta2 v + (1 - beta2) g^2
        v *= beta2
        xp.multiply(g, g, out=update)
        update *= 1.0 - beta2
        v += update
        # theta -= lr * wd * theta   (decoupled weight decay)
        if self.weight_decay:
            if self.decay_mask is None:
                self.data *= 1.0 - self.lr * self.weight_decay
            else:
                xp.multiply(self.data, self.decay_mask, out=update)
                update *= self.lr * self.weight_decay
                self.data -= update
        # theta -= lr * m_hat / (sqrt(v_hat) + eps) = (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        xp.sqrt(v, out=update)
        update *= 1.0 / math.sqrt(bias_correction2)
        update += self.eps
        xp.divide(m, update, out=update)
        update *= self.lr / bias_correction1
        self.data -= update

    def state_dict(self):
        """Host copies of the optimiser's state, for checkpoints."""
        return {"exp_avg": to_host(self.exp_avg).copy(), "exp_avg_sq": to_host(self.exp_avg_sq).copy(),
                "step_count": self.step_count, "lr": self.lr}

    def load_state_dict(self, state):
        for name in ("exp_avg", "exp_avg_sq"):
            if tuple(state[name].shape) != tuple(self.exp_avg.shape):
                raise ValueError(f"optimizer state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(self.exp_avg.shape)}: it belongs to another model")
        xp = get_array_module(self.data)
        self.exp_avg[...] = xp.asarray(state["exp_avg"])
        self.exp_avg_sq[...] = xp.asarray(state["exp_avg_sq"])
        self.step_count = int(state["step_count"])
        self.lr = float(state["lr"])



# AdamW's GPU twins (kernels/adamw.py) are registered here rather than in the kernels package, so that
# importing the kernels never imports the optimiser (predict, the report and the demo need none of it)
register_gpu_twin(AdamW.apply_step)(adamw_kernels.apply_step_on_gpu)
register_gpu_twin(AdamW.grad_norm)(adamw_kernels.grad_norm_on_gpu)
register_gpu_twin(AdamW.scale_to_max_norm)(adamw_kernels.scale_to_max_norm_on_gpu)

def warmup_cosine(step, *, total_steps, warmup_steps, peak_lr, final_lr=0.0):
    """Linear warmup from peak_lr/warmup_steps to peak_lr, then cosine decay to final_lr at total_steps.

    `step` counts from 0; the value is the learning rate to use for that step.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model, weight_decay):
    """Weight decay on the weight matrices (2-D), none on biases, LayerNorm, cls_token, pos_embedding."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        (decayed if name.endswith(".weight") and parameter.data.ndim == 2 else not_decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]

