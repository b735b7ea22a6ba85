"""
Speed and memory of model.py for a named config, on random tokens (no data needed):
training tokens/s and MFU for a full step (forward + backward + AdamW), peak memory, and generation tokens/s
with and without the KV cache; with --rollout=True also GRPO's rollout: a group of G sampled replies to one prompt
generated as one batch (what babyllama.rl.rollout does for grpo.py) against G one-at-a-time generations.

    python bench.py config/bench_rival.py            # the shared CPU config the rivals were measured at
    python bench.py config/baby_92m.py --compile=True --dtype=bfloat16
    torchrun --standalone --nproc_per_node=2 bench.py config/baby_92m.py --parallel=fsdp --skip_gen=True
    python bench.py --rollout=True --skip_train=True --skip_gen=True --rollout_group=8 --rollout_new_tokens=64

Memory: --estimate=True prints babyllama.memory.training_memory's bytes per process (weights, gradients, optimizer
state, activations, peak) for full / LoRA training, DDP / FSDP over world_size processes, activation
checkpointing off / on, and the largest micro-batch that fits memory_gb; with --measure=True the training
steps then run as configured and their measured peak (CPU: the rise of the resident set from before the
model was built, via /proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated) is printed beside the
estimate for the same set-up.
"""
import os
import statistics
import sys
import time

import torch

from babyllama import dist, optimize, precision, runlog
from babyllama.configurator import apply_overrides
from babyllama.generate import compile_decode, generate
from babyllama.memory import peak_memory_rise, reset_peak_memory, training_memory
from babyllama.optimize import configure_optimizers
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------------------------------------
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0
vocab_size = 8000
multiple_of = 32
max_seq_len = 256
batch_size = 8
gradient_accumulation_steps = 1
tie_embeddings = True
device = "auto"
dtype = "auto"
compile = "auto"  # True, False, or 'auto': the fast path of this device (babyllama/precision.py)
num_threads = 2  # CPU threads (the rivals were measured with 2)
warmup_steps = 3
steps = 10
gen_tokens = 256  # capped at max_seq_len - prompt_len
gen_prompt_len = 7
gen_runs = 3
skip_train = False
skip_gen = False
parallel = "ddp"  # under torchrun: 'ddp' or 'fsdp' (babyllama.dist.parallelize); each process trains batch_size
optimizer = "adamw"  # or 'muon'
activation_checkpointing = False
estimate = False  # print the memory estimates (babyllama.memory.training_memory) for this shape
measure = False  # measure this run's peak memory and print it beside babyllama.memory.training_memory's estimate
memory_gb = 80.0  # the memory per GPU the estimate's largest micro-batch must fit
world_size = 8  # the processes the estimate's DDP / FSDP rows assume
lora_rank = 8  # the estimate's LoRA rows
rollout = False  # also time GRPO's rollout: a group as one batch against one reply at a time (one process)
rollout_group = 8  # G: replies to the one prompt
rollout_new_tokens = 64  # sampled tokens per reply (no stop token: every reply runs to the end)
rollout_runs = 3
# -----------------------------------------------------------------------------------------------------------
apply_overrides(globals())
if measure and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536" and "RANK" not in os.environ:
    # glibc keeps freed memory in its heap for reuse, so the resident set would measure the allocator's
    # high-water mark, not the tensors alive at once: a fixed threshold maps every block over 64 KiB on its own
    # and returns it when freed. (Set before the process starts, so start again with it.)
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))

run = dist.setup_ddp(device, parallel) if "RANK" in os.environ else dist.Run(device=device)
run.parallel = parallel if run.ddp else "ddp"
device = precision.resolve_device(run.device)
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cpu":
    precision.configure_cpu()
    threads = max(1, (num_threads or torch.get_num_threads()) // run.world_size)
    torch.set_num_threads(threads)
else:
    torch.backends.cuda.matmul.allow_tf32 = True
run.dtype = dtype = precision.resolve_dtype(dtype, device_type)
run.compile = compile = precision.resolve_compile(compile, device_type, dtype)
run.device, run.device_type = device, device_type
say = print if run.master else (lambda *a, **k: None)
say(f"path: {precision.describe_path(device_type, dtype, compile)}")
autocast_ctx, scaler = precision.amp_setup(device_type, dtype)
args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None, vocab_size=vocab_size,
                 multiple_of=multiple_of, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings)

GiB = 2 ** 30
if estimate:
    say(f"memory per process (GiB) at batch {batch_size} x {max_seq_len}, {dtype}, {optimizer}, largest micro-batch "
        f"within {memory_gb:g} GiB (babyllama.memory.training_memory; {device_type} kernels):")
    say("| method | parallel | act. ckpt | weights | grads | optimizer | activations | peak | max batch |")
    say("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for method, rank in (("full", 0), (f"LoRA r={lora_rank}", lora_rank)):
        for par, n in (("1 process", 1), (f"DDP x{world_size}", world_size), (f"FSDP x{world_size}", world_size)):
            for ac in (False, True):
                kw = dict(dtype=dtype, device_type=device_type, optimizer=optimizer, lora_rank=rank, world_size=n,
                          parallel="fsdp" if par.startswith("FSDP") else "ddp", activation_checkpointing=ac)
                m = training_memory(args, batch_size, **kw)
                # the peak grows with the batch: bisect for the largest that fits (0: not even one sequence)
                lo, hi = 0, 4096
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if training_memory(args, mid, **kw)["peak"] <= memory_gb * GiB else (lo, mid - 1)
                say(f"| {method} | {par} | {'on' if ac else 'off'} | {m['weights'] / GiB:.2f} | "
                    f"{m['gradients'] / GiB:.2f} | {m['optimizer'] / GiB:.2f} | {m['activations'] / GiB:.2f} | "
                    f"{m['peak'] / GiB:.2f} | {lo} |")

if skip_train and skip_gen and not rollout:  # the estimate alone (also of a GPU set-up on a CPU: --device=cuda)
    raise SystemExit(0)
if measure:  # one step of a tiny model first: the kernels' code pages count in the resident set once touched
    tiny = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=vocab_size, max_seq_len=8)).to(device)
    t_opt = configure_optimizers(tiny, 0.1, 3e-4, (0.9, 0.95), device_type, optimizer)
    with autocast_ctx:
        tiny(torch.zeros(1, 8, dtype=torch.long, device=device), torch.zeros(1, 8, dtype=torch.long,
                                                                             device=device), False)[1].backward()
    optimize.optimizer_step(t_opt, scaler, 1.0)
    del tiny, t_opt
baseline = reset_peak_memory(device_type)  # the measured peak is the rise from here
torch.manual_seed(0)
model = Transformer(args).to(device)
say(f"config: dim {dim}, layers {n_layers}, heads {n_heads}/{n_kv_heads or n_heads}, vocab {vocab_size}, "
    f"seq {max_seq_len}, batch {batch_size}x{gradient_accumulation_steps}; {model.num_params() / 1e6:.2f}M params; "
    f"{device}, {dtype}, compile={compile}, threads={torch.get_num_threads()}, {run.world_size} process(es), "
    f"{run.parallel}")


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


if not skip_train:
    train_model = dist.parallelize(model, run, activation_checkpointing)  # compile, DDP or FSDP
    optim = configure_optimizers(model, 0.1, 3e-4, (0.9, 0.95), device_type, optimizer)
    torch.manual_seed(run.rank)  # each process its own tokens
    x = torch.randint(0, vocab_size, (batch_size, max_seq_len + 1), device=device)
    tokens_per_step = batch_size * max_seq_len * gradient_accumulation_steps * run.world_size

    def train_step():
        for micro in range(gradient_accumulation_steps):
            with dist.gradient_sync(train_model, micro == gradient_accumulation_steps - 1):
                with autocast_ctx:
                    _, loss = train_model(x[:, :-1], x[:, 1:], return_logits=False)
                scaler.scale(loss / gradient_accumulation_steps).backward()
        optimize.optimizer_step(optim, scaler, 1.0)

    for _ in range(warmup_steps):  # includes compilation
        train_step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    mfu = model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)  # per process
    say(f"train: {tokens_per_step / dt:,.0f} tokens/s (median of {steps} steps, {dt * 1000:.1f} ms/step; "
        f"min {tokens_per_step / max(times):,.0f}, max {tokens_per_step / min(times):,.0f})"
        + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ", MFU n/a on CPU")
        + f", {model.flops_per_token() * tokens_per_step / dt / 1e9:,.1f} GFLOP/s")
    rise = dist.all_reduce_sum(peak_memory_rise(device_type, baseline), run) / run.world_size
    say(f"train: peak memory {runlog.peak_memory_mb(device_type):,.0f} MiB; rise during the run {rise / 2 ** 20:,.0f} MiB "
        f"per process (mean of {run.world_size})")
    if measure:
        est = training_memory(args, batch_size, dtype=dtype, device_type=device_type, optimizer=optimizer,
                              world_size=run.world_size, parallel=run.parallel,
                              activation_checkpointing=activation_checkpointing)["peak"]
        say(f"memory: measured {rise / 2 ** 20:,.1f} MiB, estimated {est / 2 ** 20:,.1f} MiB, "
            f"estimate / measured = {est / rise:.3f}")
    del optim
    model.zero_grad(set_to_none=True)

# bf16 only pays on GPUs here: a CPU's bf16 matrix-vector products are slower than fp32's
gen_ctx = autocast_ctx if device_type == "cuda" else torch.autocast("cpu", enabled=False)
if not skip_gen and not run.ddp:
    model.eval()
    n_new = min(gen_tokens, max_seq_len - gen_prompt_len - 1)
    prompt = torch.randint(0, vocab_size, (1, gen_prompt_len), device=device)
    if compile:
        with gen_ctx:
            eager_out = generate(model, prompt, n_new, temperature=0.0)
        compile_decode(model)
        with gen_ctx:
            same = generate(model, prompt, n_new, temperature=0.0) == eager_out  # also compiles
        print(f"generate: compiled decode step gives the eager tokens: {same}")
    for use_cache in (True, False):
        rates = []
        for _ in range(gen_runs):
            sync()
            t0 = time.perf_counter()
            with gen_ctx:
                out = generate(model, prompt, n_new, temperature=0.0, use_cache=use_cache)
            sync()
            rates.append(len(out[0]) / (time.perf_counter() - t0))
        print(f"generate: {statistics.median(rates):,.1f} tokens/s {'with' if use_cache else 'without'} KV cache "
              f"(greedy, {n_new} new tokens from a {gen_prompt_len}-token prompt, median of {gen_runs})")
    print(f"peak memory {runlog.peak_memory_mb(device_type):,.0f} MiB")
if rollout and not run.ddp:
    model.eval()
    prompt = torch.randint(0, vocab_size, (1, gen_prompt_len), device=device)
    n_new = min(rollout_new_tokens, max_seq_len - gen_prompt_len - 1)
    rates = {"one batch": [], "one at a time": []}
    with gen_ctx:
        generate(model, prompt.repeat(rollout_group, 1), n_new, temperature=1.0)  # warm-up
        for r in range(rollout_runs):
            for name, groups in (("one at a time", [1] * rollout_group), ("one batch", [rollout_group])):
                sync()
                t0, n = time.perf_counter(), 0
                for k, g in enumerate(groups):  # g rows of the one prompt: a group as rl.rollout batches it
                    rng = torch.Generator(device=device).manual_seed(10_000 + 100 * r + k)
                    n += sum(len(x) for x in generate(model, prompt.repeat(g, 1), n_new, temperature=1.0,
                                                      generator=rng))
                sync()
                rates[name].append(n / (time.perf_counter() - t0))
    batch, single = statistics.median(rates["one batch"]), statistics.median(rates["one at a time"])
    print(f"rollout: a group of {rollout_group} as one batch {batch:,.0f} tokens/s, one at a time {single:,.0f} "
          f"tokens/s ({batch / single:.1f}x; {n_new} sampled tokens per reply from a {gen_prompt_len}-token prompt, "
          f"median of {rollout_runs})")
if not skip_train:
    del train_model  # the DDP/FSDP wrapper goes before the process group (babyllama.dist.cleanup_ddp)
dist.cleanup_ddp(run)
