"""
Speed and memory of model.py for a named config, on random tokens (no data needed):
training tokens/s and MFU for a full step (forward + backward + AdamW), peak memory, and generation tokens/s
with and without the KV cache.

    python bench.py config/bench_rival.py            # the shared CPU config the rivals were measured at
    python bench.py config/baby_92m.py --compile=True --dtype=bfloat16
"""
import statistics
import time

import torch

from configurator import apply_overrides
from model import ModelArgs, Transformer
import train_utils as tu

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
compile = "auto"  # True, False, or 'auto': the fast path of this device (train_utils.cpu_fast_path)
num_threads = 2  # CPU threads (the rivals were measured with 2)
warmup_steps = 3
steps = 10
gen_tokens = 256  # capped at max_seq_len - prompt_len
gen_prompt_len = 7
gen_runs = 3
skip_train = False
skip_gen = False
# -----------------------------------------------------------------------------------------------------------
apply_overrides(globals())

device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cpu":
    tu.configure_cpu()
    if num_threads:
        torch.set_num_threads(num_threads)
else:
    torch.backends.cuda.matmul.allow_tf32 = True
dtype = tu.resolve_dtype(dtype, device_type)
compile = tu.resolve_compile(compile, device_type, dtype)
print(f"path: {tu.describe_path(device_type, dtype, compile)}")
autocast_ctx, scaler = tu.amp_setup(device_type, dtype)
torch.manual_seed(0)
args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None, vocab_size=vocab_size,
                 multiple_of=multiple_of, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings)
model = Transformer(args).to(device)
print(f"config: dim {dim}, layers {n_layers}, heads {n_heads}/{n_kv_heads or n_heads}, vocab {vocab_size}, "
      f"seq {max_seq_len}, batch {batch_size}x{gradient_accumulation_steps}; {model.num_params() / 1e6:.2f}M params; "
      f"{device}, {dtype}, compile={compile}, threads={torch.get_num_threads()}")


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


if not skip_train:
    optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device_type)
    train_model = torch.compile(model) if compile else model
    x = torch.randint(0, vocab_size, (batch_size, max_seq_len + 1), device=device)
    tokens_per_step = batch_size * max_seq_len * gradient_accumulation_steps

    def train_step():
        for _ in range(gradient_accumulation_steps):
            with autocast_ctx:
                _, loss = train_model(x[:, :-1], x[:, 1:], return_logits=False)
            scaler.scale(loss / gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

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
    mfu = model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
    print(f"train: {tokens_per_step / dt:,.0f} tokens/s (median of {steps} steps, {dt * 1000:.1f} ms/step; "
          f"min {tokens_per_step / max(times):,.0f}, max {tokens_per_step / min(times):,.0f})"
          + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ", MFU n/a on CPU")
          + f", {model.flops_per_token() * tokens_per_step / dt / 1e9:,.1f} GFLOP/s")
    print(f"train: peak memory {tu.peak_memory_mb(device_type):,.0f} MiB")
    del optimizer, train_model
    model.zero_grad(set_to_none=True)

if not skip_gen:
    model.eval()
    # bf16 only pays on GPUs here: a CPU's bf16 matrix-vector products are slower than fp32's
    gen_ctx = autocast_ctx if device_type == "cuda" else torch.autocast("cpu", enabled=False)
    n_new = min(gen_tokens, max_seq_len - gen_prompt_len - 1)
    prompt = torch.randint(0, vocab_size, (1, gen_prompt_len), device=device)
    if compile:
        with gen_ctx:
            eager_out = model.generate(prompt, n_new, temperature=0.0)
        model.compile_decode()
        with gen_ctx:
            same = model.generate(prompt, n_new, temperature=0.0) == eager_out  # also compiles
        print(f"generate: compiled decode step gives the eager tokens: {same}")
    for use_cache in (True, False):
        rates = []
        for _ in range(gen_runs):
            sync()
            t0 = time.perf_counter()
            with gen_ctx:
                out = model.generate(prompt, n_new, temperature=0.0, use_cache=use_cache)
            sync()
            rates.append(len(out[0]) / (time.perf_counter() - t0))
        print(f"generate: {statistics.median(rates):,.1f} tokens/s {'with' if use_cache else 'without'} KV cache "
              f"(greedy, {n_new} new tokens from a {gen_prompt_len}-token prompt, median of {gen_runs})")
    print(f"peak memory {tu.peak_memory_mb(device_type):,.0f} MiB")
