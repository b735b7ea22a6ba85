"""Sharded checkpoints of FSDP runs (torch.distributed.checkpoint, DCP): save and load every process's shards, swap the
ckpt.dcp / best.dcp links atomically, and read one back as a single file's dict. out_dir/ckpt.dcp (and best.dcp) links
to out_dir/dcp/iter_NNNNNNNN: every process's shards of the trainable weights and optimizer state, and extra.pt with the
other fields and the CRC-32 of every shard file (checked on loading); it loads on any number of processes (DCP re-cuts)."""
import contextlib
import os
import shutil
import warnings

import torch.distributed as dist

from babyllama.tensor_file import CheckpointError, file_crc, load, save


def load_extra(folder):
    """A sharded checkpoint's extra.pt with "dcp": the folder, whose shards load_sharded reads once the model is
    sharded. FileNotFoundError naming the file when it is missing; CheckpointError naming extra.pt when it is damaged,
    or the shard files whose CRC-32 differs from the one extra.pt recorded (older folders are not checked)."""
    extra = os.path.join(folder, "extra.pt")
    if not os.path.exists(extra):
        raise FileNotFoundError(f"{extra} not found: {folder} is not a complete sharded checkpoint")
    ckpt = load(extra)
    for name, crc in ckpt.pop("shard_crc", {}).items():
        shard = os.path.join(folder, name)
        if not os.path.exists(shard):
            raise CheckpointError(f"{shard} not found: {folder} is not a complete sharded checkpoint")
        if file_crc(shard) != crc:
            raise CheckpointError(f"{shard}: corrupted or truncated ({os.path.getsize(shard):,} bytes whose CRC-32 "
                                  f"differs from the one extra.pt recorded)")
    return dict(ckpt, dcp=os.path.realpath(folder))


def _optimizers(optimizer):
    return getattr(optimizer, "optimizers", [optimizer])  # optimize.Optimizers holds several


def sharded_state(model, optimizer):
    """The DCP state of a run: the trainable parameters (a LoRA run's adapters; DTensor shards under FSDP) and the
    optimizer state keyed by parameter name, so another number of processes can re-cut both."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    return {"model": weights, "optim": get_optimizer_state_dict(model, _optimizers(optimizer))}


def save_sharded(link, model, optimizer, extra, run, best_link=None):
    """Write a DCP checkpoint (a collective) into out_dir/dcp/iter_N, the master adds extra.pt, points `link` (and
    best_link) at it by an atomic symlink swap and removes the folders no link names: a kill at any moment leaves a
    loadable checkpoint. Assumes a folder every process can write (one machine, or a shared file system)."""
    import torch.distributed.checkpoint as dcp  # here, not at the top: it takes most of a second to import
    root = os.path.join(os.path.dirname(os.path.abspath(link)), "dcp")
    name = f"iter_{extra['iter_num']:08d}"
    folder = os.path.join(root, name)
    if run.master and os.path.exists(folder):
        # half written by a killed run (a run never rewrites a linked folder: it saves only after its resume iteration)
        shutil.rmtree(folder)
    if run.ddp:
        dist.barrier()
    dcp.save(sharded_state(model, optimizer), checkpoint_id=folder)
    if run.master:  # every process's shards are written when dcp.save returns: record their CRC-32 beside extra
        crcs = {f: file_crc(os.path.join(folder, f)) for f in os.listdir(folder)}
        save(os.path.join(folder, "extra.pt"), dict(extra, shard_crc=crcs))
        for l in (link, best_link):
            if l:
                _point(l, os.path.relpath(folder, os.path.dirname(os.path.abspath(l))))
        for old in set(os.listdir(root)) - _linked(root):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    if run.ddp:
        dist.barrier()


def _point(link, target):
    """Make `link` a symbolic link to target, atomically (a new link renamed over the old one)."""
    tmp = link + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _linked(root):
    """Names of the folders in root that ckpt.dcp or best.dcp beside it point to."""
    out_dir = os.path.dirname(root)
    return {os.path.basename(os.path.realpath(os.path.join(out_dir, l))) for l in ("ckpt.dcp", "best.dcp")
            if os.path.islink(os.path.join(out_dir, l))}


def load_sharded(folder, model, optimizer):
    """Load a DCP checkpoint's weights and optimizer state into a sharded (or plain) model and its optimizer, whatever
    number of processes wrote it (a collective). ValueError naming the folder when the optimizer state is another's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as e:  # DCP says which key it lacks; say which checkpoint and the likely cause
        raise ValueError(f"{folder}: cannot load into this run's model and optimizer (another optimizer, or "
                         f"another LoRA set-up?): {e}") from e
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, _optimizers(optimizer), state["optim"])


def consolidate(folder, device="cpu"):
    """A DCP checkpoint as the single-file checkpoint dict (what eval.py, export.py and fine-tuning read), in one
    process without a process group: extra.pt's fields and the gathered weights as "model" (a LoRA run's as "lora"). No
    optimizer state: resuming reads the folder itself."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    ckpt = load_extra(folder)
    del ckpt["dcp"]
    with warnings.catch_warnings():  # "no process group: loading in a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        weights = _load_state_dict_from_keys({"model"}, checkpoint_id=os.path.realpath(folder))["model"]
    weights = {k: v.to(device) for k, v in weights.items()}
    ckpt["lora" if "lora_config" in ckpt else "model"] = weights
    return ckpt


