"""Checkpoint files: what a checkpoint holds, written atomically, read as data (weights only, never code).

A checkpoint is one dict saved with torch.save:

    model_args        ModelArgs as a dict: the architecture, including max_seq_len
    model             the full state_dict                 } one or the other: a LoRA run saves only its
    lora, lora_config the adapter tensors; rank, alpha,   } adapters, on top of the weights of base_ckpt
    base_ckpt         dropout, targets; the base's path   }
    iter_num, best_val_loss, optimizer, scaler, rng     what resuming needs (rng: one state per process)
    config            the hyperparameters as the run used them (derived values such as lr_decay_iters filled in)
    init_ckpt         fine-tuning: the checkpoint the run started from
    tokenizer, tokenizer_sha256, data                   where the tokens came from

merged.pt (LoRA runs, at the end) is a plain checkpoint of the merged weights: model, model_args, config. FSDP runs
write sharded checkpoints (babyllama/sharded.py); `load` reads one as a single-file dict, so eval.py, export.py and
fine-tuning take a .dcp path like a .pt."""
import os

import torch

from babyllama.atomic import atomic_path
from babyllama.sharded import consolidate


def save(path, state):
    """torch.save(state) through a temp file and a rename: a killed save never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path, device="cpu"):
    """The checkpoint dict at path, tensors on device (weights_only: data, never code); a DCP folder comes back as
    consolidate's single-file dict (no optimizer state). FileNotFoundError naming the path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if os.path.isdir(path):
        return consolidate(path, device)
    return torch.load(path, map_location=device, weights_only=True)
