"""
What every training script (pretrain.py, sft.py, dpo.py) repeats, written once: DDP set-up, mixed
precision, the LR schedule, the optimizer step, token-file batches, step timing, JSONL logs and loss plots.
Checkpoints live in checkpoint.py. Each function is small and independent; the training loops themselves
stay in the scripts.
"""
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from clean_data.atomic import atomic_path, write_jsonl
from configurator import exit_error


# ---- distributed ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Where and how this process trains: set up once by setup_run, read by the loop.
    ddp: launched by torchrun; rank / local_rank / world_size: this process among world_size; master: rank 0
    (the one that prints, logs and writes); device: 'cpu' or 'cuda:N'; device_type: 'cpu' or 'cuda';
    accum: micro-steps per process per iteration; dtype: 'float32' / 'bfloat16' / 'float16'; autocast: the
    context for forward passes; scaler: the GradScaler (enabled only for float16); compile: whether the
    script compiles its model (setup_run's resolution of compile='auto'); parallel: 'ddp' (every process holds
    the whole model) or 'fsdp' (parameters, gradients and optimizer state sharded over the processes)."""
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_type: str = "cpu"
    accum: int = 1
    dtype: str = "float32"
    autocast: object = None
    scaler: object = None
    compile: bool = False
    parallel: str = "ddp"

    @property
    def master(self):
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def setup_ddp(device="auto", parallel="ddp"):
    """Initialise torch.distributed when launched by torchrun (RANK in the environment): nccl on GPUs, gloo
    on CPUs. parallel='fsdp' without torchrun starts a group of one process (fully_shard needs a group; one
    process then trains as it would alone, and its checkpoints are the same sharded format). Returns a Run with
    ddp (a process group is up), rank, local_rank, world_size and the device this process uses."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        exit_error(f"error: device must be one of auto, cpu, cuda, cuda:N, not {device!r}")
    if int(os.environ.get("RANK", -1)) == -1:
        if parallel != "fsdp":
            return Run(device=device)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return Run(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size, device=device, parallel=parallel)


def free_port():
    """A TCP port nobody listens on now (for a one-process group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile=False, fixed_shapes=True,
              parallel="ddp"):
    """What every training script sets up before its data and model: DDP, the device and its precision (dtype
    and compile may be 'auto': the fast path of this device, see cpu_fast_path), CPU threads, the output
    folder. gradient_accumulation_steps counts the micro-steps of all processes together, so it must divide
    by the number of processes. A configuration error ends the run with one line from rank 0. num_threads
    (0 = torch's default, all cores) is shared among the processes of one machine: 2 processes on 2 cores
    get 1 thread each, not 2 that fight for the same cores. parallel: 'ddp' or 'fsdp' (see parallelize; fsdp
    refuses float16, whose loss scaler FSDP's sharded gradients do not support: use bfloat16). Returns a Run
    (run.compile: the choice made)."""
    if gradient_accumulation_steps < 1 or gradient_accumulation_steps % int(os.environ.get("WORLD_SIZE", "1")):
        exit_error(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be a positive multiple "
                   f"of the {os.environ.get('WORLD_SIZE', '1')} processes (it counts the micro-steps of all of them "
                   f"together); set --gradient_accumulation_steps=N accordingly (the batch per process stays "
                   f"batch_size)")
    if dtype not in DTYPES:
        exit_error(f"error: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if parallel not in PARALLEL:
        exit_error(f"error: parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}")
    if parallel == "fsdp" and dtype == "float16":
        exit_error("error: parallel='fsdp' trains in bfloat16 or float32; float16 needs a loss scaler for sharded "
                   "gradients that this project does not ship: use --dtype=bfloat16")
    run = setup_ddp(device, parallel)
    run.device_type = "cuda" if run.device.startswith("cuda") else "cpu"
    run.accum = gradient_accumulation_steps // run.world_size
    if run.device_type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (num_threads or torch.get_num_threads()) // local) if run.ddp else num_threads
        if threads:
            torch.set_num_threads(threads)
        configure_cpu()
    else:
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls: fp32 range, ~8x the throughput
        torch.backends.cudnn.allow_tf32 = True
    run.dtype = resolve_dtype(dtype, run.device_type)
    run.compile = resolve_compile(compile, run.device_type, run.dtype, fixed_shapes)
    run.autocast, run.scaler = amp_setup(run.device_type, run.dtype)
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{run.world_size} process(es) on {run.device} ({parallel}), {torch.get_num_threads()} thread(s) each; "
              f"precision {describe_path(run.device_type, run.dtype, run.compile, fixed_shapes)}")
    return run


def cleanup_ddp(run):
    """Leave the process group at the end of a torchrun run (nothing to do in a single process). Delete the
    DistributedDataParallel wrapper first: with its reducer still alive when the group goes, gloo aborted about
    one CPU run in 15 at exit ("terminate called without an active exception"; none in 80 once deleted)."""
    if run.ddp and dist.is_initialized():
        import gc
        gc.collect()  # the wrapper's reference cycles, so its reducer is really gone
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value, run):
    """The sum of a Python number over all processes."""
    if not run.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.device if run.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.item()


def all_reduce_mean(value, run):
    """The mean of a Python float over all processes (so every process logs and decides on the same number)."""
    return all_reduce_sum(value, run) / run.world_size


def wrap_ddp(module, run):
    """The module under DistributedDataParallel when running under torchrun, else the module itself."""
    if not run.ddp:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[run.local_rank] if run.device_type == "cuda" else None)


PARALLEL = ("ddp", "fsdp")


def parallelize(model, run, activation_checkpointing=False, cpu_offload=False, replicas=1, outer=None):
    """Make a Transformer ready to train on this run's processes; returns the module the loop calls.
    - Activation checkpointing (any parallel): each block's activations are recomputed in the backward pass
      instead of kept (model.activation_checkpointing; the gradients are the same).
    - parallel='ddp': torch.compile (run.compile) of `outer` (a module wrapping the model, e.g. sft's PackedLM;
      default the model), then DistributedDataParallel under torchrun.
    - parallel='fsdp' (FSDP2, torch.distributed.fsdp.fully_shard; Zhao et al. 2023): each block compiled on its
      own (run.compile), then sharded, then the root (embedding, final norm, output: tied weights stay one
      parameter); parameters, gradients and optimizer state are split over the processes and gathered one
      block at a time. Mixed precision when run.dtype is bfloat16: bf16 parameters in compute, gradients
      reduced in fp32. cpu_offload keeps the shards (and the optimizer's work) in CPU memory. replicas > 1:
      HSDP, a 2-D mesh (replicas, world_size / replicas): shard within a group (a node), replicate across.
      The model is changed in place (its parameters become DTensor shards): create the optimizer after this.
    Gradient accumulation skips the gradient reduction of all but the last micro-step: see gradient_sync."""
    for layer in model.layers:
        layer.checkpointing = activation_checkpointing
    if run.parallel != "fsdp":
        module = outer if outer is not None else model
        return wrap_ddp(torch.compile(module) if run.compile else module, run)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method
    if cpu_offload and run.device_type != "cuda":
        raise SystemExit("cpu_offload=True moves FSDP's shards from GPU memory to CPU memory; this run is on the CPU "
                         "already: leave it False")
    if run.world_size % replicas:
        raise SystemExit(f"replicas={replicas} must divide the {run.world_size} processes (HSDP shards within "
                         f"world_size / replicas processes)")
    mesh = None
    if replicas > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(run.device_type, (replicas, run.world_size // replicas),
                                mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if run.dtype == "bfloat16" else MixedPrecisionPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.layers:
        if run.compile:
            layer.compile()
        fully_shard(layer, **shard)
    fully_shard(model, **shard)
    # packed rows (sft), generation and scoring call this method rather than forward: it must gather the root too
    register_fsdp_forward_method(model, "_forward_positions")
    return outer if outer is not None else model


def gradient_sync(module, sync):
    """Context for one micro-step's backward: with sync False the processes' gradients are not reduced yet
    (DDP's no_sync; FSDP2's set_requires_gradient_sync(False): they accumulate unsharded), so only the last
    micro-step of an iteration communicates. A single process ignores it."""
    if sync:
        return nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    fsdp = [m for m in ([module] + list(module.children())) if hasattr(m, "set_requires_gradient_sync")]
    if not fsdp:
        return nullcontext()
    return _fsdp_no_sync(fsdp[0])


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ---- precision --------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_features():
    """What this CPU offers the kernels torch will run: ATen's vector capability ('AVX2', 'AVX512', ...; it
    honours ATEN_CPU_CAPABILITY, so a machine told to use AVX2 only reports AVX2), and whether the CPU has
    AMX tiles or AVX512-BF16 instructions, the two ways a CPU multiplies bf16 matrices in hardware."""
    return dict(capability=torch.backends.cpu.get_cpu_capability(), amx=torch.cpu._is_amx_tile_supported(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported())


def cpu_fast_path(features, fixed_shapes=True):
    """The fastest training precision and compile choice for a CPU with these features (cpu_features()), by
    what this project measured (bench.py config/bench_rival.py, 2 threads, training tokens/s):
    - bf16 matrix units (AMX, or AVX512-BF16 with AVX-512 kernels in use): bf16 autocast. On an AMD EPYC with
      AVX512-BF16, bf16 ran 1.9x fp32 eager and 2.2x with compile; on Intel Xeons with AMX ~2.5x.
    - none (AVX2 only): fp32. bf16 there has no matrix units and emulates them: 16x slower than fp32 eager.
    compile: on CPU torch.compile gained 4-22% per step (fp32 / bf16) but costs a warm-up of tens of
    seconds, so it is chosen only where it pays most (bf16 units) and only for fixed shapes (pretraining's
    windows; padded chat batches change shape every step and recompile).
    Returns (dtype, compile, reason), reason a sentence for the log."""
    units = [name for name, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if features.get(key)]
    vector = features.get("capability", "")
    if units and "AVX512" in vector:
        return "bfloat16", fixed_shapes, (f"{' and '.join(units)} multiply bf16 matrices in hardware: bf16 autocast"
                                          + (" + torch.compile" if fixed_shapes else ""))
    why = "no bf16 matrix units" if not units else f"{'/'.join(units)} present but ATen is limited to {vector}"
    return "float32", False, f"{why} ({vector} kernels): bf16 would be emulated, many times slower; fp32"


def resolve_dtype(dtype, device_type, features=None):
    """'auto' = bf16 on GPUs that support it, fp16 on older GPUs; on CPU, cpu_fast_path's choice (features:
    cpu_features(), probed when None). Raises SystemExit naming the allowed values for anything else."""
    if dtype not in DTYPES:
        raise SystemExit(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return cpu_fast_path(features or cpu_features())[0]


def resolve_compile(compile, device_type, dtype, fixed_shapes=True, features=None):
    """compile = True / False, or 'auto': on GPUs, compile models trained on fixed shapes; on CPU, what
    cpu_fast_path chooses when dtype (resolved) is its dtype, else False (a run told to use another precision
    is off the measured path). SystemExit for any other value."""
    if isinstance(compile, bool):
        return compile
    if compile != "auto":
        raise SystemExit(f"compile must be True, False or 'auto', not {compile!r}")
    if device_type == "cuda":
        return fixed_shapes
    path_dtype, path_compile, _ = cpu_fast_path(features or cpu_features(), fixed_shapes)
    return path_compile and dtype == path_dtype


def describe_path(device_type, dtype, compile, fixed_shapes=True):
    """One line saying which precision and compile choice a run uses and why (setup_run and bench.py print it)."""
    if device_type != "cpu":
        return f"{dtype}, compile={compile}"
    features = cpu_features()
    path_dtype, path_compile, reason = cpu_fast_path(features, fixed_shapes)
    chosen = "the fast path" if (dtype, compile) == (path_dtype, path_compile) else \
        f"set by the config (the fast path would be {path_dtype}, compile={path_compile})"
    return f"{dtype}, compile={compile}: {chosen}; this CPU: {features['capability']}, {reason}"


def amp_setup(device_type, dtype):
    """The autocast context for forward passes and a GradScaler (enabled only for fp16, whose small range
    needs loss scaling; bf16 has fp32's range)."""
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    return autocast, scaler


def configure_cpu():
    """CPU settings every script uses."""
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


def set_lr(optimizer, it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Set the learning rate of iteration it (get_lr) on every parameter group; returns it."""
    lr = get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer, scaler, grad_clip):
    """One update from the accumulated gradients: unscale (fp16), clip the global norm of the optimizer's
    parameters' gradients to grad_clip (0 = no clipping), step, update the loss scale, clear the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class StepTimer:
    """Wall time of the training iterations alone, and the tokens they trained on. lap(n_tokens) ends an
    iteration and returns its seconds (since the previous lap, or the start); skip() after an evaluation or
    a checkpoint write makes that time count toward no iteration. The first lap is the warm-up (memory
    allocation, torch.compile's compilation: tens of seconds): kept apart in warmup_seconds, so seconds and
    tokens, the totals of the other laps, give tokens per second the same way in every script.
    out_of_time(max_minutes): the wall time since the start, everything included, has reached max_minutes
    (0 = no limit)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.start = self.t0 = clock()
        self.seconds, self.tokens, self.laps, self.warmup_seconds = 0.0, 0, 0, 0.0

    def lap(self, n_tokens):
        """End an iteration that trained on n_tokens; returns its seconds."""
        t = self.clock()
        dt, self.t0 = t - self.t0, t
        self.laps += 1
        if self.laps == 1:
            self.warmup_seconds = dt
        else:
            self.seconds += dt
            self.tokens += n_tokens
        return dt

    def skip(self):
        """Leave the time since the last lap out of every iteration (evaluation, saving)."""
        self.t0 = self.clock()

    def out_of_time(self, max_minutes, run=None):
        """True once the wall time since the start has reached max_minutes (0 = never). With a DDP run, True on
        every process as soon as it is on one: processes that disagree on the last iteration would call
        different collectives and hang."""
        if not max_minutes:
            return False
        late = (self.clock() - self.start) / 60 >= max_minutes
        return all_reduce_sum(float(late), run) > 0 if run is not None else late


class Progress:
    """What a person sees of a training loop (the master only; the JSONL log keeps every number): a first line
    saying what the stage will do, one tqdm bar with the ETA, loss and tokens/s, and, once `measure` iterations
    have run, the expected training time on this machine: the median iteration of the second half of those
    (the first few iterations are slow: memory allocation, kernel selection, compilation; 3 iterations of ~5 s
    before settling at 0.18 s in one CPU run). Lines printed meanwhile (the evaluations, through
    JsonlLog.write) appear above the bar."""

    def __init__(self, stage, start, total, what, enabled=True, measure=24):
        """stage: its name ('pretrain'); start, total: the first and the end iteration; what: the plan (e.g.
        '1,000 iterations x 4,096 tokens')."""
        self.enabled, self.left, self.measure, self.stage = enabled, total - start, measure, stage
        self.bar, self.dts = None, []
        if not enabled:
            return
        from tqdm import tqdm
        print(f"{stage}: {what}", flush=True)
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="it", dynamic_ncols=True, smoothing=0.05,
                        mininterval=0.5 if _stderr_is_tty() else 30)

    def step(self, loss, n_tokens, dt):
        """After one training iteration of dt seconds on n_tokens: advance the bar; once `measure` iterations
        have run, say how long the rest will take."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {n_tokens / max(dt, 1e-9):,.0f} tok/s", refresh=False)
        if len(self.dts) >= min(self.measure, self.left):
            return
        self.dts.append(dt)
        if len(self.dts) == min(self.measure, self.left):
            per_iter = float(np.median(self.dts[len(self.dts) // 2:]))
            self.bar.write(f"{self.stage}: {per_iter:.3f} s per iteration (median of iterations "
                           f"{len(self.dts) // 2 + 1}-{len(self.dts)}): about "
                           f"{per_iter * (self.left - len(self.dts)) / 60:.1f} min to go on this machine, "
                           f"evaluations aside")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _stderr_is_tty():
    import sys
    return sys.stderr.isatty()


# ---- token files ------------------------------------------------------------------------------------------

def open_bins(spec, vocab_size=None, like=None, min_tokens=1):
    """Memory-map one or many uint16 token files (spec: comma-separated paths or globs) after checking each, so
    that wrong token data is refused by name instead of training silently:
    - its meta.json (data_process.py writes it beside the .bin files) exists and says dtype uint16;
    - the byte length is even, not zero, and matches the token count meta.json gives for the file (an int32
      file has twice the bytes);
    - every file (and `like`, another file's meta dict, e.g. train's for val) comes from one tokenizer: the same
      tokenizer_sha256 and vocab_size;
    - the largest id is below vocab_size (default: meta.json's), one pass over each file;
    - it holds at least min_tokens tokens (max_seq_len + 1 for training windows).
    Returns (list of 1-D np.memmap uint16, their paths, the first file's meta dict). Raises FileNotFoundError
    for a part that matches no file or a missing meta.json, ValueError naming the file for everything else."""
    import glob
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
        check_bin(p, metas[-1], like or metas[0])
        bins.append(np.memmap(p, dtype=np.uint16, mode="r"))
    first = like or metas[0]
    vocab_size = vocab_size or first.get("vocab_size")
    for p, b in zip(paths, bins):
        if len(b) < min_tokens:
            raise ValueError(f"{p}: {len(b):,} tokens, fewer than the {min_tokens:,} of one window (max_seq_len + 1)")
        top = max_token(b)
        if vocab_size and top >= vocab_size:
            raise ValueError(f"{p}: token id {top} >= vocab_size {vocab_size}: not tokens of this model's "
                             f"tokenizer (or not uint16 token ids at all)")
    return bins, paths, metas[0]


def check_bin(path, meta, like=None):
    """The checks of open_bins that need no pass over the data (ValueError naming path)."""
    if meta.get("dtype", "uint16") != "uint16":
        raise ValueError(f"{path}: meta.json says dtype {meta['dtype']!r}; token files are uint16")
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f"{path}: {size} bytes, an odd number: not a file of uint16 tokens")
    if size == 0:
        raise ValueError(f"{path}: no tokens (data_process.py writes an empty val.bin when the corpus is too small "
                         f"for val_fraction: raise it, or train without validation: --val_data='')")
    name = os.path.basename(path)  # tokens_per_file by file name; older meta.json: train_tokens, val_tokens
    expected = meta.get("tokens_per_file", {}).get(name, meta.get(f"{os.path.splitext(name)[0]}_tokens"))
    if expected is not None and expected * 2 != size:
        raise ValueError(f"{path}: {size} bytes but meta.json counts {expected:,} uint16 tokens ({expected * 2:,} "
                         f"bytes): another dtype, or a file from another run of data_process.py")
    for key in ("tokenizer_sha256", "vocab_size"):
        if like is not None and like.get(key) and meta.get(key) and like[key] != meta[key]:
            raise ValueError(f"{path}: {key} {meta[key]} differs from the other token files' {like[key]}: "
                             f"files tokenized with different tokenizers cannot be mixed")


def max_token(tokens, chunk=1 << 26):
    """The largest id in a 1-D token array, read in chunks (a memmap is not loaded whole)."""
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def read_meta(bin_path):
    """The meta.json that data_process.py writes beside a .bin file. Raises FileNotFoundError naming it."""
    path = os.path.join(os.path.dirname(os.path.abspath(bin_path)), "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: every token file needs the meta.json data_process.py writes "
                                f"beside it (its tokenizer, vocab_size and token counts)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def get_batch(bins, batch_size, max_seq_len, seed, step, micro_step, device, stream=0):
    """A batch of random windows from the token files: x (batch_size, max_seq_len) int64 token ids and
    y = x shifted by one (the next token at every position), on device.

    The windows depend only on (seed, stream, step, micro_step), not on what was drawn before: a resumed
    run and a run split over processes (rank r takes micro-steps r*A..r*A+A-1) see exactly the batches an
    uninterrupted single-process run sees. Files are picked in proportion to their length. stream 0 is
    training, 1 validation. Raises ValueError when a file is shorter than max_seq_len + 1 tokens."""
    rng = np.random.default_rng([seed, stream, step, micro_step])  # stream 0 = training, 1 = validation
    sizes = np.array([len(b) - max_seq_len - 1 for b in bins])
    if (sizes <= 0).any():
        raise ValueError(f"a token file is shorter than max_seq_len + 1 = {max_seq_len + 1} tokens")
    which = rng.choice(len(bins), size=batch_size, p=sizes / sizes.sum())
    starts = rng.integers(0, sizes[which])
    rows = np.stack([bins[w][s:s + max_seq_len + 1] for w, s in zip(which, starts)]).astype(np.int64)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


@torch.no_grad()
def estimate_loss(model, bins, batch_size, max_seq_len, eval_iters, device, autocast_ctx, seed=0):
    """Mean next-token loss (nats per token) over eval_iters fixed batches of the token files: the same
    batches at every evaluation, so the points of a run compare."""
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


# ---- RNG state ----------------------------------------------------------------------------------

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


def load_tokenizer(path, vocab_size, sha256=""):
    """The Tokenizer at path, checked against the model: its vocabulary size and, when the checkpoint recorded
    it, the sha256 of the tokenizer it was trained with (SystemExit naming the file when either differs)."""
    from tokenizer import Tokenizer
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
        raise SystemExit(f"tokenizer {path} has {tok.vocab_size} tokens, the model {vocab_size}")
    if sha256 and tok.sha256() != sha256:
        raise SystemExit(f"{path} is not the tokenizer the model was trained with (sha256 {tok.sha256()[:12]}..., "
                         f"the checkpoint's {sha256[:12]}...)")
    return tok


# ---- logging ----------------------------------------------------------------------------------------------

class JsonlLog:
    """A run's log: one JSON object per line, flushed at once so a killed run keeps its log. Only the master
    process logs (enabled=False elsewhere: every call does nothing). write(line, **record) also prints line to
    the terminal, when given. resume_from: the iteration a resumed run starts from; the log of the run it
    continues is kept up to there (the rows a killed run wrote after its last checkpoint are dropped, so no
    iteration appears twice); None starts a new log."""

    def __init__(self, path, resume_from=None, enabled=True):
        self.path, self.enabled, self.f = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_from is not None and os.path.exists(path):
            # the checkpoint of iteration N is written after N's evaluation and before N's training step
            kept = [r for r in read_jsonl(path) if "iter" in r and r["iter"] is not None and
                    (r["iter"] < resume_from or (r["iter"] == resume_from and "loss" not in r))]
        write_jsonl(path, kept)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, line=None, **record):
        """Print line (if given) and append record, with a "time" stamp, as one JSON line."""
        if not self.enabled:
            return
        if line is not None:
            from tqdm import tqdm
            tqdm.write(line)  # above a progress bar, when one is on the terminal
        record.setdefault("time", round(time.time(), 3))
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        """Close the file (after which write() must not be called)."""
        if self.f is not None:
            self.f.close()


def read_jsonl(path):
    """The records of a JSONL log (one JSON object per line); a line cut short by a kill is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_log(log_path, png_path, series=(("loss", "train"), ("val_loss", "val")), title="loss", ylabel=None):
    """Plot chosen fields of a JSONL log against 'iter' into a PNG (written atomically), titled. A series of
    many points (a training loss logged every iteration) is drawn faint, with its smoothed curve (an
    exponential moving average, bias-corrected like Adam's, so its start is not pulled toward 0) over it.
    With BABYLLAMA_PLOTS=0 in the environment nothing is drawn (the test suite's setting: matplotlib's start-up
    is ~1 s of CPU in each of its ~100 training runs; the tests of the plots turn it back on)."""
    if os.environ.get("BABYLLAMA_PLOTS", "1") == "0":
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_jsonl(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in series:
        pts = [(r["iter"], r[key]) for r in records if key in r and r[key] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if len(pts) < 30:
            ax.plot(xs, ys, label=label, marker="o")
            continue
        raw, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=raw.get_color(), label=f"{label} (smoothed)")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel or title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def smooth(values, beta=0.95):
    """Exponential moving average of a sequence, bias-corrected: out[i] = EMA_i / (1 - beta^(i+1))."""
    out, ema = [], 0.0
    for i, v in enumerate(values):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta ** (i + 1)))
    return out


def peak_memory_mb(device_type):
    """Peak memory of this process: allocated CUDA memory on GPUs, the resident set size on CPU (Linux)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device_type):
    """Start a peak-memory measurement; returns the baseline in bytes. CPU (Linux): the resident set now, after
    resetting the kernel's high-water mark (writing 5 to /proc/self/clear_refs); GPU: the allocated bytes now,
    after torch.cuda.reset_peak_memory_stats."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_memory_rise(device_type, baseline):
    """Bytes the peak rose above reset_peak_memory's baseline since then (CPU: VmHWM - baseline)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return _proc_status_kib("VmHWM") * 1024 - baseline


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def throughput(timer, device_type):
    """The end-of-run figures every script reports the same way: tokens trained on, training seconds (a
    StepTimer's: evaluation, saving and the first iteration's warm-up excluded), the warm-up's seconds, tokens
    per second, and peak memory in MiB."""
    return dict(train_tokens=timer.tokens, train_seconds=round(timer.seconds, 1),
                warmup_seconds=round(timer.warmup_seconds, 1),
                tokens_per_sec=round(timer.tokens / max(timer.seconds, 1e-9), 1),
                peak_memory_mb=round(peak_memory_mb(device_type), 1))
