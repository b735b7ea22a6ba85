"""
LoRA (Hu et al. 2021) for the Transformer of model.py, written out: W x + (alpha / r) * B A dropout(x).

    from lora import apply_lora, lora_state_dict, merge_lora
    apply_lora(model, rank=8, alpha=16, dropout=0.05)      # freezes everything else
    ... train ...
    torch.save(lora_state_dict(model), "adapter.pt")        # adapter tensors only
    merge_lora(model)                                       # plain nn.Linear again, W + (alpha/r) B A

A is initialised like nn.Linear (Kaiming uniform) and B with zeros, so a fresh adapter leaves the model's
outputs unchanged. LoRALinear.weight is the effective (merged) weight, so code that reads .weight
directly, such as Transformer's stacked generation weights, sees the adapted layer.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections


class LoRALinear(nn.Module):
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
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def merged(self):
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=False,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
        return lin

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def _targets(targets):
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return tuple(targets)


def apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, freeze=True):
    """Replace the nn.Linear submodules whose attribute name is in targets by LoRALinear, in place; with
    freeze every other parameter stops requiring grad. Returns the model."""
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
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state_dict(model):
    """Only the adapter tensors (names as in the adapted model's state_dict)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def base_state_dict(model):
    """The base weights under the plain model's names (".base." removed), adapters left out."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def load_lora_state_dict(model, sd):
    missing = {k for k in model.state_dict() if "lora_" in k} - set(sd)
    unexpected = set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise KeyError(f"adapter does not fit the model: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(unexpected)[:4]}")
    model.load_state_dict(sd, strict=False)


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place: the model
    then has exactly the state_dict keys of the un-adapted Transformer (for eval, export, serving)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    model.__dict__.pop("lora_config", None)
    return model


def load_checkpoint_model(path, device="cpu", merge=True):
    """A Transformer from any checkpoint this project writes: pretrain/full-SFT ones ("model") or LoRA SFT
    ones ("lora": adapter only, on top of the base checkpoint they name). With merge the adapter is folded
    into the weights. Returns (model, ckpt)."""
    from model import ModelArgs, Transformer
    import train_utils as tu
    ckpt = tu.load_checkpoint(path, device)
    if "lora" not in ckpt:
        model = Transformer(ModelArgs(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device), ckpt
    base_path = ckpt["base_ckpt"]
    if not os.path.exists(base_path):  # the base moved along with the adapter: look beside it
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(base_path))
    model, _ = load_checkpoint_model(base_path, device)
    cfg = ckpt["lora_config"]
    apply_lora(model, cfg["rank"], cfg["alpha"], 0.0, cfg["targets"])
    load_lora_state_dict(model, ckpt["lora"])
    if merge:
        merge_lora(model)
    return model.to(device), ckpt


def build_finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len=0, dropout=0.0, lora_rank=0,
                         lora_alpha=16.0, lora_dropout=0.0, lora_targets=DEFAULT_TARGETS):
    """The model a fine-tuning run (sft.py, dpo.py) trains: the starting checkpoint's weights (a LoRA
    checkpoint comes back merged) in its architecture with this run's context length (0 = keep) and
    dropout, LoRA adapters when lora_rank, and a resumed run's weights or adapters on top.
    Returns (model on device, model_args, the starting weights' state dict, the starting checkpoint)."""
    from model import ModelArgs, Transformer
    base, init = load_checkpoint_model(init_ckpt, device)
    model_args = dict(init["model_args"])
    model_args["max_seq_len"] = max_seq_len or model_args["max_seq_len"]
    model_args["dropout"] = dropout
    torch.manual_seed(seed)  # the same LoRA initialisation on every rank
    model = Transformer(ModelArgs(**model_args))
    start_state = base.state_dict()
    model.load_state_dict(start_state)
    del base
    if resume_ckpt is not None and "model" in resume_ckpt:
        model.load_state_dict(resume_ckpt["model"])
    if lora_rank:
        apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        if resume_ckpt is not None:
            load_lora_state_dict(model, resume_ckpt["lora"])
    return model.to(device), model_args, start_state, init
