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
    checksum          a CRC-32 of every tensor, checked by load (babyllama/tensor_file.py); older files load unchecked

merged.pt (LoRA runs, at the end) is a plain checkpoint of the merged weights: model, model_args, config. FSDP runs
write sharded checkpoints (babyllama/sharded.py); `load` reads one as a single-file dict, so eval.py, export.py and
fine-tuning take a .dcp path like a .pt."""
import os

from babyllama.sharded import consolidate
# save, copy and CheckpointError are this module's API too: scripts and the library reach the file through here
from babyllama.tensor_file import CheckpointError, copy, load as load_file, save  # noqa: F401


def load(path, device="cpu"):
    """The checkpoint dict at path, tensors on device (weights_only: data, never code); a DCP folder comes back as
    consolidate's single-file dict (no optimizer state). FileNotFoundError naming the path; CheckpointError naming the
    file and what is wrong with it (empty, truncated, corrupted: tensor_file.load)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if os.path.isdir(path):
        return consolidate(path, device)
    return load_file(path, device)
