"""
What every training script (pretrain.py, sft.py, dpo.py) repeats, written once: DDP set-up, mixed
precision, the LR schedule, token-file batches, atomic checkpoints, JSONL logs and loss plots.
Each function is small and independent; the training loops themselves stay in the scripts.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


# ---- distributed ------------------------------------------------------------------------------------------

def setup_ddp(device="auto"):
    """Initialise torch.distributed when launched by torchrun (RANK in the environment). Returns a dict with
    ddp, rank, local_rank, world_size, master (rank 0) and the device string this process uses."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return dict(ddp=False, rank=0, local_rank=0, world_size=1, master=True, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return dict(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device)


def setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir):
    """What every training script sets up before its data and model: DDP, the device and its precision,
    CPU threads, the output folder. Returns setup_ddp's dict plus device_type, accum (micro-steps per
    process: gradient_accumulation_steps counts all processes), dtype, autocast (a context) and scaler."""
    ctx = setup_ddp(device)
    ctx["device_type"] = "cuda" if ctx["device"].startswith("cuda") else "cpu"
    if gradient_accumulation_steps % ctx["world_size"]:
        raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} must divide by the "
                         f"{ctx['world_size']} processes")
    ctx["accum"] = gradient_accumulation_steps // ctx["world_size"]
    if num_threads:
        torch.set_num_threads(num_threads)
    if ctx["device_type"] == "cpu":
        configure_cpu()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls: fp32 range, ~8x the throughput
        torch.backends.cudnn.allow_tf32 = True
    ctx["dtype"] = resolve_dtype(dtype, ctx["device_type"])
    ctx["autocast"], ctx["scaler"] = amp_setup(ctx["device_type"], ctx["dtype"])
    if ctx["master"]:
        os.makedirs(out_dir, exist_ok=True)
    return ctx


def cleanup_ddp(ctx):
    if ctx["ddp"] and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value, ctx):
    """Average a Python float over all ranks (for logging the same number everywhere)."""
    if not ctx["ddp"]:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx["device"] if ctx["device"].startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.item() / ctx["world_size"]


# ---- precision --------------------------------------------------------------------------------------------

def resolve_dtype(dtype, device_type):
    """'auto' = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def amp_setup(device_type, dtype):
    """The autocast context for forward passes and a GradScaler (enabled only for fp16, whose small range
    needs loss scaling; bf16 has fp32's range)."""
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    return ctx, scaler


def configure_cpu():
    # subnormal floats make CPU matmuls 2-5x slower a few steps into training; flush them to zero
    torch.set_flush_denormal(True)


# ---- schedule ---------------------------------------------------------------------------------------------

def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ---- token files ------------------------------------------------------------------------------------------

def open_bins(spec):
    """Memory-map one or many uint16 token files: a comma-separated list of paths or globs."""
    import glob
    paths = []
    for part in [p for p in spec.split(",") if p]:
        matches = sorted(glob.glob(part))
        if not matches:
            raise FileNotFoundError(f"token file {part!r} not found (run data_process.py first)")
        paths += matches
    return [np.memmap(p, dtype=np.uint16, mode="r") for p in paths], paths


def read_meta(bin_path):
    """The meta.json that data_process.py writes beside a .bin file, or {} if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(bin_path)), "meta.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def get_batch(bins, batch_size, block_size, seed, step, micro_step, device, stream=0):
    """A batch of random windows (x, y = x shifted by one) from the token files.

    The windows depend only on (seed, step, micro_step), not on what was drawn before: a resumed run and
    a run split over ranks (rank r takes micro-steps r*A..r*A+A-1) see exactly the batches an uninterrupted
    single-process run sees. Files are picked in proportion to their length."""
    rng = np.random.default_rng([seed, stream, step, micro_step])  # stream 0 = training, 1 = validation
    sizes = np.array([len(b) - block_size - 1 for b in bins])
    if (sizes <= 0).any():
        raise ValueError(f"a token file is shorter than block_size+1 = {block_size + 1} tokens")
    which = rng.choice(len(bins), size=batch_size, p=sizes / sizes.sum())
    starts = rng.integers(0, sizes[which])
    rows = np.stack([bins[w][s:s + block_size + 1] for w, s in zip(which, starts)]).astype(np.int64)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


@torch.no_grad()
def estimate_loss(model, bins, batch_size, block_size, eval_iters, device, autocast_ctx, seed=0):
    """Mean loss over eval_iters fixed batches (the same batches at every evaluation, so points compare)."""
    was_training = model.training
    model.eval()
    losses = []
    for k in range(eval_iters):
        x, y = get_batch(bins, batch_size, block_size, seed, 0, k, device, stream=1)
        with autocast_ctx:
            _, loss = model(x, y, return_logits=False)
        losses.append(loss.item())
    model.train(was_training)
    return float(np.mean(losses))


# ---- checkpoints ------------------------------------------------------------------------------------------

def atomic_write_bytes(path, write_fn):
    """Write through a temp file in the same directory, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    # weights_only: a checkpoint is data, never code
    return torch.load(path, map_location=device, weights_only=True)


def unwrap(model):
    """The plain Transformer under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx):
    """Each rank's RNG state (dropout draws differ per rank), as a list indexed by rank."""
    state = rng_state()
    if not ctx["ddp"]:
        return [state]
    states = [None] * ctx["world_size"]
    dist.all_gather_object(states, state)
    return states


def restore_or_seed(ckpt, optimizer, scaler, ctx, seed, iter_num):
    """Resuming: the optimizer, loss scaler and this rank's RNG state from the checkpoint. Starting: seed
    each rank differently (dropout masks must differ across ranks). A checkpoint from another world size
    cannot give every rank its own state, so the RNG is reseeded deterministically instead."""
    if ckpt is None:
        torch.manual_seed(seed + ctx["rank"])
        return
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    if len(states) == ctx["world_size"]:
        set_rng_state(states[ctx["rank"]])
    else:
        torch.manual_seed(seed + ctx["rank"] + iter_num)
        if ctx["master"]:
            print(f"note: checkpoint had {len(states)} rank(s), now {ctx['world_size']}: RNG reseeded")


def load_tokenizer(path, vocab_size):
    """The Tokenizer at path, checked against the model's vocabulary size."""
    from tokenizer import Tokenizer
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
        raise SystemExit(f"tokenizer {path} has {tok.vocab_size} tokens, the model {vocab_size}")
    return tok


# ---- logging ----------------------------------------------------------------------------------------------

class JsonlLog:
    """One JSON object per line, flushed at once so a killed run keeps its log."""

    def __init__(self, path, resume=False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.f = open(path, "a" if resume else "w", encoding="utf-8")

    def write(self, **record):
        record.setdefault("time", round(time.time(), 3))
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(log_path, png_path, series=(("loss", "train"), ("val_loss", "val")), title="loss"):
    """Plot chosen fields of a JSONL log against 'iter' into a PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_jsonl(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in series:
        pts = [(r["iter"], r[key]) for r in records if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def check_finite(value, it, out_dir):
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss became {value} at iteration {it}; stopping. The last good checkpoint in {out_dir} is untouched "
            f"(lower learning_rate, check the data, or use bfloat16 instead of float16).")


# ---- conversations (SFT / DPO data) -----------------------------------------------------------------------

def read_conversations(path):
    """The unified conversations sft_data_process.py writes (.jsonl or .parquet): a list of dicts
    {"messages": [{"role", "content"}, ...], "system": str or None, "source": str}."""
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_memory_mb(device_type):
    """Peak memory of this process: allocated CUDA memory on GPUs, the resident set size on CPU (Linux)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
