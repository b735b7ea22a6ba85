"""RNG state: every generator a training step draws from, saved per process so a resumed run continues exactly."""
import random

import torch
import torch.distributed as dist


def rng_state():
    """This process's RNG state (torch, Python, and CUDA when present) as tensors and lists, which
    torch.load(weights_only=True) reads back."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(run):
    """Each process's RNG state (dropout draws differ per process), as a list indexed by rank. A collective."""
    state = rng_state()
    if not run.ddp:
        return [state]
    states = [None] * run.world_size
    dist.all_gather_object(states, state)
    return states
