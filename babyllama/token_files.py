"""Token files: open and check the .bin files data_process.py writes, sample batches, estimate a loss. The ids are in
meta.json's dtype: uint16 whenever the vocabulary fits (and when a meta.json predates the field), else uint32."""
import glob
import json
import os

import numpy as np
import torch

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # meta.json's "dtype" -> the ids' array type


def open_bins(spec, vocab_size=None, like=None, min_tokens=1):
    """Memory-map one or many token files (spec: comma-separated paths or globs), each checked so wrong data is
    refused by name:
    - its meta.json (data_process.py writes it) exists and its dtype (absent: uint16) holds vocab_size's ids;
    - the byte length is whole ids, non-zero and matches meta.json's token count (an int32 file has twice the bytes);
    - every file (and `like`: another's meta, e.g. train's for val) has one tokenizer_sha256 and vocab_size;
    - the largest id is below vocab_size (default: meta.json's);
    - it holds at least min_tokens tokens (max_seq_len + 1 for training windows).
    Returns (1-D np.memmap list, each in its meta.json's dtype, their paths, the first file's meta).
    FileNotFoundError for a part that matches no file or a missing meta.json, ValueError naming the file otherwise."""
    paths = []
    for part in [p for p in spec.split(",") if p]:
        matches = sorted(glob.glob(part))
        if not matches:
            raise FileNotFoundError(f"token file {part!r} not found (run data_process.py first)")
        paths += matches
    if not paths:
        raise FileNotFoundError(f"no token file given ({spec!r})")
    bins, metas = [], []
    for p in paths:
        metas.append(read_meta(p))
        bins.append(np.memmap(p, dtype=check_bin(p, metas[-1], like or metas[0]), mode="r"))
    first = like or metas[0]
    vocab_size = vocab_size or first.get("vocab_size")
    for p, b in zip(paths, bins):
        if len(b) < min_tokens:
            raise ValueError(f"{p}: {len(b):,} tokens, fewer than the {min_tokens:,} of one window (max_seq_len + 1)")
        top = max_token(b)
        if vocab_size and top >= vocab_size:
            raise ValueError(f"{p}: token id {top} >= vocab_size {vocab_size}: not tokens of this model's "
                             f"tokenizer (or not {b.dtype} token ids at all)")
    return bins, paths, metas[0]


def check_bin(path, meta, like=None):
    """The checks of open_bins that need no pass over the data (ValueError naming path, or its meta.json and field).
    Returns the ids' numpy dtype (meta.json's "dtype"; absent: uint16, as every file written before the field)."""
    name, where = meta.get("dtype", "uint16"), os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
    if name not in TOKEN_DTYPES:
        raise ValueError(f"{where}: dtype {name!r} (for {path}): token files are {' or '.join(TOKEN_DTYPES)}")
    dtype = np.dtype(TOKEN_DTYPES[name])
    if meta.get("vocab_size") and meta["vocab_size"] - 1 > np.iinfo(dtype).max:
        raise ValueError(f"{where}: dtype {name} cannot hold the ids of vocab_size {meta['vocab_size']} (for {path})")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes, not a whole number of {dtype} tokens ({dtype.itemsize} bytes each, "
                         f"meta.json's dtype)")
    if size == 0:
        raise ValueError(f"{path}: no tokens (data_process.py writes an empty val.bin when the corpus is too small "
                         f"for val_fraction: raise it, or train without validation: --val_data='')")
    name = os.path.basename(path)  # tokens_per_file by file name; older meta.json: train_tokens, val_tokens
    expected = meta.get("tokens_per_file", {}).get(name, meta.get(f"{os.path.splitext(name)[0]}_tokens"))
    if expected is not None and expected * dtype.itemsize != size:
        raise ValueError(f"{path}: {size} bytes but meta.json counts {expected:,} {dtype} tokens: another dtype "
                         f"than meta.json's dtype, or a file from another run of data_process.py")
    for key in ("tokenizer_sha256", "vocab_size"):
        if like is not None and like.get(key) and meta.get(key) and like[key] != meta[key]:
            raise ValueError(f"{path}: {key} {meta[key]} differs from the other token files' {like[key]}: "
                             f"files tokenized with different tokenizers cannot be mixed")
    return dtype


def max_token(tokens, chunk=1 << 26):
    """The largest id in a 1-D token array, read in chunks (a memmap is not loaded whole)."""
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def read_meta(bin_path):
    """The meta.json data_process.py writes beside a .bin file. FileNotFoundError naming it; ValueError naming it when
    it is not JSON."""
    path = os.path.join(os.path.dirname(os.path.abspath(bin_path)), "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: every token file needs the meta.json data_process.py writes "
                                f"beside it (its tokenizer, vocab_size and token counts)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError: a truncated or overwritten file
        raise ValueError(f"{path}: not JSON ({e}); data_process.py writes it (rerun it)") from e


def get_batch(bins, batch_size, max_seq_len, seed, step, micro_step, device, stream=0, weights=None):
    """Random windows from the token files: x (batch_size, max_seq_len) int64 and y = x shifted by one, on device.
    Windows depend only on (seed, stream, step, micro_step): a resumed run and a multi-process run (rank r takes
    micro-steps r*A..r*A+A-1) see the batches of an uninterrupted single-process run. A window is max_seq_len + 1
    tokens: a file of n tokens has n - max_seq_len of them (starts 0..n - max_seq_len - 1), and files are picked in
    proportion to that count, or to weights (one per file: data mixing, each file's expected share of the windows
    and so of the tokens, however long it is). ValueError when a file is shorter than one window."""
    rng = np.random.default_rng([seed, stream, step, micro_step])  # stream 0 = training, 1 = validation
    windows = np.array([len(b) - max_seq_len for b in bins])
    if (windows <= 0).any():
        raise ValueError(f"a token file is shorter than max_seq_len + 1 = {max_seq_len + 1} tokens")
    share = windows if weights is None else np.asarray(weights, dtype=np.float64)
    which = rng.choice(len(bins), size=batch_size, p=share / share.sum())
    starts = rng.integers(0, windows[which])  # exclusive bound: the last start is windows - 1
    rows = np.stack([bins[w][s:s + max_seq_len + 1] for w, s in zip(which, starts)]).astype(np.int64)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


@torch.no_grad()
def estimate_loss(model, bins, batch_size, max_seq_len, eval_iters, device, autocast_ctx, seed=0):
    """Mean next-token loss (nats/token) over eval_iters batches, the same at every evaluation so points compare."""
    was_training = model.training
    model.eval()
    losses = []
    for k in range(eval_iters):
        x, y = get_batch(bins, batch_size, max_seq_len, seed, 0, k, device, stream=1)
        with autocast_ctx:
            _, loss = model(x, y, return_logits=False)
        losses.append(loss.item())
    model.train(was_training)
    return float(np.mean(losses))
