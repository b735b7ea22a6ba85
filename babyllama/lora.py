"""LoRA (Hu et al. 2021) for model.py's Transformer, written out: W x + (alpha / r) * B A dropout(x).

    apply_lora(model, rank=8, alpha=16, dropout=0.05)      # freezes everything else
    ... train ...
    torch.save(lora_state_dict(model), "adapter.pt")        # adapter tensors only
    merge_lora(model)                                       # plain nn.Linear again, W + (alpha/r) B A

LoRALinear.weight is the effective (merged) weight, so code reading .weight (generation's stacked weights) sees it."""
from contextlib import contextmanager
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections


class LoRALinear(nn.Module):
    """An nn.Linear `base` plus a trainable low-rank adapter: y = base(x) + (alpha / rank) * B A dropout(x); A (rank,
    in_features) Kaiming-uniform, B (out_features, rank) zeros, on base.weight's device and dtype, so a fresh adapter
    changes nothing. apply_lora freezes base. rank 0 raises ZeroDivisionError, a negative rank RuntimeError."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):
        """Effective weight W + scaling * B A (out, in), base.weight's dtype, recomputed per access (differentiable)."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)

    @property
    def in_features(self):
        """base.in_features, so the wrapper reads like an nn.Linear."""
        return self.base.in_features

    @property
    def out_features(self):
        """base.out_features, so the wrapper reads like an nn.Linear."""
        return self.base.out_features

    def forward(self, x):
        """x (..., in_features) -> (..., out_features), without forming B A; dropout on the adapter path only."""
        return self.base(x) + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def merged(self):
        """A new nn.Linear (base's device and dtype) holding self.weight and base's bias, if any; self unchanged."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if lin.bias is not None:  # model.py's attention_bias (Qwen2)
                lin.bias.copy_(self.base.bias)
        return lin

    def extra_repr(self):
        """rank and alpha, for print(model)."""
        return f"rank={self.rank}, alpha={self.alpha}"


def _targets(targets):
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return tuple(targets)


def apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, freeze=True):
    """Replace the nn.Linear submodules named in targets (a list, or a string such as "wq,wv") by LoRALinear, in place;
    with freeze every other parameter stops requiring grad. Sets model.lora_config = {rank, alpha, dropout, targets}
    (what a checkpoint records); returns the model. "output" on a tied model adapts the output layer only (see
    merge_lora). ValueError for rank <= 0 or when no layer matches."""
    targets = _targets(targets)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                replaced += 1
    if not replaced:
        raise ValueError(f"no nn.Linear named {targets} in the model")
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))
    return model


def lora_parameters(model):
    """The adapter parameters (lora_A, lora_B of every LoRALinear)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state_dict(model):
    """Only the adapter tensors (names as in the adapted model's state_dict)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def base_state_dict(model):
    """The base weights under the plain model's names (".base." removed), adapters left out."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def load_lora_state_dict(model, sd):
    """Load adapter tensors (lora_state_dict's) into an adapted model; KeyError unless the names fit exactly."""
    missing = {k for k in model.state_dict() if "lora_" in k} - set(sd)
    unexpected = set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise KeyError(f"adapter does not fit the model: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(unexpected)[:4]}")
    model.load_state_dict(sd, strict=False)


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place: the state_dict keys of the
    un-adapted Transformer (for eval, export, serving). Returns the model.

    An output adapter on a tied model (model.args.tie_embeddings) makes the output W + (alpha/r) B A differ from the
    embedding W: model.args becomes a copy (it may be shared) with tie_embeddings=False, so Transformer(model.args)
    loads the merged state_dict and gives the same logits. If they are still equal, the tie is restored instead."""
    embedding = getattr(model, "tok_embeddings", None)
    tied = [(module, name) for module in model.modules() for name, child in module.named_children()
            if isinstance(child, LoRALinear) and embedding is not None and child.base.weight is embedding.weight]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for module, name in tied:
        layer = getattr(module, name)
        if torch.equal(layer.weight, embedding.weight):
            layer.weight = embedding.weight  # nothing learned: share the tensor again, as before apply_lora
        elif getattr(getattr(model, "args", None), "tie_embeddings", False):
            # tied, loading would write the merged output over the embedding (one tensor): the args must say untied
            model.args = dataclasses.replace(model.args, tie_embeddings=False)
    model.__dict__.pop("lora_config", None)
    return model


@contextmanager
def adapters_off(model):
    """Within the block the LoRA model computes its base model's function (every adapter's scaling 0): the reference
    policy of a LoRA DPO/RL run, with no second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s
