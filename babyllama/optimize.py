"""The optimizer: AdamW (or Muon + AdamW) over model.py's parameter groups, the LR schedule and the clipped step."""
import inspect
import math

import torch


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                         muon_momentum=0.95):
    """The optimizer of model's parameters that require grad (groups from model.optimizer_groups). optimizer='adamw':
    torch.optim.AdamW, betas (beta1, beta2); fused on cuda and cpu when AdamW has it, plain AdamW if that raises
    RuntimeError or TypeError. optimizer='muon': torch.optim.Muon (Jordan et al. 2024: Nesterov momentum
    `muon_momentum`, then 5 Newton-Schulz orthogonalisation steps) for the blocks' 2-D matrices, AdamW for the
    embedding, output layer and norms. Muon's step is scaled to AdamW's update size (adjust_lr_fn='match_rms_adamw', Liu
    et al. 2025, "Muon is scalable"), so one learning_rate and schedule serve both; returns an Optimizers of the two.
    ValueError for another optimizer name."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
    groups, hidden = model.optimizer_groups(weight_decay, muon=optimizer == "muon")
    # the fused kernel runs the whole update in one launch per group: on GPUs, and on CPU since torch 2.4
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    try:
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
    if optimizer == "adamw":
        return adamw
    muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, momentum=muon_momentum,
                            adjust_lr_fn="match_rms_adamw")
    return Optimizers([adamw, muon])


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def set_lr(optimizer, it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Set the learning rate of iteration it (get_lr) on every parameter group; returns it."""
    lr = get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer, scaler, grad_clip):
    """One update from the accumulated gradients: unscale (fp16), clip the gradients' global norm to grad_clip (0 = no
    clipping), step, update the loss scale, clear the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class Optimizers:
    """Several optimizers stepped as one (Muon for the blocks' matrices, AdamW for the rest): param_groups are all of
    theirs (for the LR schedule and clipping), the other methods go to each; `optimizers` lists them (for DCP)."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        """Raises ValueError when the state is another optimizer's (e.g. an AdamW run resumed with Muon)."""
        if "optimizers" not in state or len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this optimizer's (adamw vs muon?): resume "
                             "with the optimizer the run started with")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
