"""scratchvit's ViT in PyTorch: the one reference the parity tests and `python -m scratchvit.bench
--compare-torch` hold scratchvit against.

The same architecture as scratchvit/vit.py at dropout 0: the same patch layout, a Linear patch
embedding, the CLS token, the position embedding, pre-LN blocks with one qkv Linear viewed as
(B, T, 3, heads, head_dim), scores scaled by 1/sqrt(head_dim), an explicit softmax and attn @ v,
GELU (tanh), the final LayerNorm on the CLS token, the head; the parameters carry scratchvit's names,
in the same order, so a scratchvit `state_dict()` copies in (`torch_vit(..., state=...)`).
`TorchTrainStep` is PyTorch's version of scratchvit's training step, as the benchmark times it.

It lives in the repository's tools/ folder, not in the package: PyTorch is never a dependency of
scratchvit, and this file is a tool for checking and comparing it from a checkout.
"""
import math

import numpy
import torch

from scratchvit.backend import to_host

nn, F = torch.nn, torch.nn.functional


def torch_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    """Multi-head self-attention as written in PyTorch ViTs: one qkv product viewed as [3, heads, head_dim]
    (weights in torch's (out, in) layout)."""
    B, T, D = x.shape
    head_dim = D // heads
    qkv = F.linear(x, qkv_weight, qkv_bias)                                                    # (B, T, 3D)
    q, k, v = qkv.view(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)                        # each (B, H, T, d)
    attn = torch.softmax((q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1), dim=-1)      # (B, H, T, T)
    return F.linear((attn @ v).transpose(1, 2).reshape(B, T, D), proj_weight, proj_bias)


class TorchAttention(nn.Module):
    def __init__(self, dim, heads, **factory):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(self, x):
        return torch_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.heads)


class TorchEncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, eps, **factory):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.attn = TorchAttention(dim, heads, **factory)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.fc1 = nn.Linear(dim, mlp_dim, **factory)
        self.fc2 = nn.Linear(mlp_dim, dim, **factory)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x)), approximate="tanh"))


class TorchViT(nn.Module):
    """scratchvit's ViT (dropout 0) in PyTorch, with the same parameter names, in the same order."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=1,
                 eps=1e-5, dtype=torch.float32, device="cpu"):
        super().__init__()
        factory = dict(dtype=dtype, device=device)
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **factory))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim, **factory))
        self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim, **factory)
        self.blocks = nn.ModuleList(TorchEncoderBlock(dim, heads, mlp_dim, eps, **factory) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.head = nn.Linear(dim, num_classes, **factory)

    def forward(self, images):
        B, C, H, W = images.shape
        p = self.patch_size
        patches = (images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
                   .reshape(B, (H // p) * (W // p), p * p * C))                               # like Patchify
        tokens = self.patch_embed(patches)                                                     # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1) + self.pos_embedding  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))                                                   # (B, K)

    @staticmethod
    def _is_linear_weight(name, tensor):
        return name.endswith(".weight") and tensor.ndim == 2     # torch stores (out, in), scratchvit (in, out)

    def load_scratchvit_state(self, state):
        """Copy a scratchvit `state_dict()` (NumPy or CuPy arrays, Linear weights (in, out)) into this model."""
        own = dict(self.named_parameters())
        if set(own) != set(state):
            difference = sorted(set(own) ^ set(state))
            raise ValueError(f"the PyTorch model and scratchvit's differ in parameter {difference[0]!r}")
        with torch.no_grad():
            for name, parameter in own.items():
                value = torch.from_numpy(numpy.ascontiguousarray(to_host(state[name])))
                if self._is_linear_weight(name, parameter):
                    value = value.T
                if tuple(value.shape) != tuple(parameter.shape):
                    raise ValueError(f"parameter {name!r}: scratchvit has shape {tuple(state[name].shape)}, "
                                     f"the PyTorch model {tuple(parameter.shape)}")
                parameter.copy_(value)
        return self

    def scratchvit_gradients(self):
        """{name: NumPy gradient} in scratchvit's layout (Linear weights (in, out))."""
        return {name: (p.grad.T if self._is_linear_weight(name, p) else p.grad).detach().cpu().numpy()
                for name, p in self.named_parameters()}

    def scratchvit_state(self):
        """{name: NumPy copy of the parameter} in scratchvit's layout."""
        return {name: (p.T if self._is_linear_weight(name, p) else p).detach().cpu().numpy().copy()
                for name, p in self.named_parameters()}


def torch_vit(config, *, dtype="float32", device="cpu", state=None):
    """The PyTorch twin of `ViT(**config)`; with `state` (a scratchvit state_dict) its weights are copied in."""
    model = TorchViT(**config, dtype=getattr(torch, str(dtype)), device=device)
    if state is not None:
        model.load_scratchvit_state(state)
    return model


class TorchTrainStep:
    """PyTorch's version of `TrainStep`: zero_grad, forward, cross_entropy, backward, clip_grad_norm_, AdamW,
    with weight decay on the weight matrices only (the rule of scratchvit's `parameter_groups`)."""

    def __init__(self, model, *, lr, weight_decay, clip_grad_norm=None):
        self.model, self.clip_grad_norm = model, clip_grad_norm
        decayed, not_decayed = [], []
        for name, parameter in model.named_parameters():
            (decayed if name.endswith(".weight") and parameter.ndim == 2 else not_decayed).append(parameter)
        self.optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                            {"params": not_decayed, "weight_decay": 0.0}], lr=lr)

    def __call__(self, images, labels):
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return loss
