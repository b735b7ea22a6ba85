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

Beside a checkpoint lies a copy of its tokenizer file (keep_tokenizer; tokenizer.json with its tokenizer_config.json).
merged.pt (LoRA runs, at the end) is a plain checkpoint of the merged weights: model, model_args, config. FSDP runs
write sharded checkpoints (babyllama/sharded.py); `load` reads one as a single-file dict, so eval.py, export.py and
fine-tuning take a .dcp path like a .pt."""
import hashlib
import os
import shutil

from babyllama.atomic import atomic_path
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


def file_sha256(path):
    """The sha256 hex digest of a file's bytes (what a checkpoint records of its tokenizer: Tokenizer.sha256)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def keep_tokenizer(ckpt_path, tokenizer, sha256=""):
    """Copy the tokenizer a checkpoint records (a .model; a tokenizer.json and the tokenizer_config.json beside it; or a
    folder holding tokenizer.model / tokenizer.json) into the checkpoint's folder under its file name, atomically,
    unless that copy is there already: a moved run folder, or another working directory, still finds it
    (inference.checkpoint_tokenizer). Returns the copy's path; "" when the file is missing or is not the one whose
    sha256 the checkpoint records (nothing copied: the checkpoint's recorded path is all a reader has then)."""
    src = tokenizer
    if os.path.isdir(src):  # (tokenizer.resolve_path's rule; tokenizer/ itself is not read to save a checkpoint)
        src = next((os.path.join(src, n) for n in ("tokenizer.model", "tokenizer.json")
                    if os.path.isfile(os.path.join(src, n))), src)
    digest = file_sha256(src) if os.path.isfile(src) else None
    if digest is None or (sha256 and digest != sha256):
        return ""
    dst = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), os.path.basename(src))
    if os.path.isfile(dst) and file_sha256(dst) == digest:
        return dst
    pairs = [(src, dst)]
    config = os.path.join(os.path.dirname(src), "tokenizer_config.json")
    if src.endswith(".json") and os.path.isfile(config):  # its bos/eos/pad names; first, so a copied json has it
        pairs.insert(0, (config, os.path.join(os.path.dirname(dst), "tokenizer_config.json")))
    for a, b in pairs:
        with atomic_path(b) as tmp:
            shutil.copyfile(a, tmp)
    return dst
