"""
Pretrain the Llama 2 model of model.py on uint16 token files written by data_process.py.

One process:        python pretrain.py config/demo_cpu.py
Several GPUs:       torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py
Several nodes:      torchrun --nnodes=2 --node_rank=0 --master_addr=IP --master_port=29500 --nproc_per_node=8 pretrain.py ...
Any global below can be overridden with --key=value after the config files.
"""
import os
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_overrides, config_of
from model import ModelArgs, Transformer
import train_utils as tu

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/pretrain"
train_data = "out/data/poetry/train.bin"  # comma-separated paths or globs: several corpora mix by length
val_data = "out/data/poetry/val.bin"
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_interval = 200
eval_iters = 20
log_interval = 10
always_save_checkpoint = True  # save at every eval; otherwise only when val loss improves
# model
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0  # 0 = n_heads; fewer for grouped-query attention
vocab_size = 0  # 0 = read from the token files' meta.json
multiple_of = 32
ffn_dim_multiplier = 0.0  # 0 = the Llama 2 default of 8/3 * dim
norm_eps = 1e-5
max_seq_len = 256
dropout = 0.0
tie_embeddings = True
rope_theta = 10000.0
# training
batch_size = 8  # micro-batch size per process
gradient_accumulation_steps = 4  # in total over all processes: must divide by the number of processes
max_iters = 2000
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
seed = 1337
# system
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
compile = False
num_threads = 0  # CPU threads; 0 = torch's default
max_minutes = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
# -----------------------------------------------------------------------------------------------------------
config_keys = list(config_of(globals()))
if __name__ == "__main__":
    apply_overrides(globals())
config = {k: globals()[k] for k in config_keys}

# ---- set-up -----------------------------------------------------------------------------------------------
ctx = tu.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir)
device, device_type, master, accum = ctx["device"], ctx["device_type"], ctx["master"], ctx["accum"]
dtype, autocast_ctx, scaler = ctx["dtype"], ctx["autocast"], ctx["scaler"]
tokens_per_iter = gradient_accumulation_steps * batch_size * max_seq_len
lr_decay_iters = lr_decay_iters or max_iters
if master:
    print(f"{ctx['world_size']} process(es) on {device}, {dtype}; {tokens_per_iter:,} tokens per iteration "
          f"({ctx['world_size']} x {accum} micro-steps x {batch_size} x {max_seq_len})")

# ---- data -------------------------------------------------------------------------------------------------
train_bins, train_paths = tu.open_bins(train_data)
val_bins, _ = tu.open_bins(val_data) if val_data else (None, None)
meta = tu.read_meta(train_paths[0])
if not vocab_size:
    if "vocab_size" not in meta:
        raise SystemExit(f"vocab_size not set and no meta.json beside {train_paths[0]}")
    vocab_size = meta["vocab_size"]
if master:
    print(f"train tokens: {sum(len(b) for b in train_bins):,} in {len(train_bins)} file(s)")

# ---- model ------------------------------------------------------------------------------------------------
model_args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None,
                  vocab_size=vocab_size, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier or None,
                  norm_eps=norm_eps, max_seq_len=max_seq_len, dropout=dropout, tie_embeddings=tie_embeddings,
                  rope_theta=rope_theta)
iter_num, best_val_loss, ckpt = 0, float("inf"), None
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":
    ckpt = tu.load_checkpoint(ckpt_path, device)
    model_args = ckpt["model_args"]  # the architecture is the checkpoint's, whatever the globals say
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
elif init_from != "scratch":
    raise SystemExit(f"init_from must be 'scratch' or 'resume', not {init_from!r}")
torch.manual_seed(seed)  # the same initial weights on every rank
model = Transformer(ModelArgs(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.to(device)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
tu.restore_or_seed(ckpt, optimizer, scaler, ctx, seed, iter_num)
if ckpt is not None and master:
    print(f"resumed from {ckpt_path} at iteration {iter_num}")
del ckpt
raw_model = model
if master:
    print(f"parameters: {raw_model.num_params() / 1e6:.2f}M")
if compile:
    model = torch.compile(model)
if ctx["ddp"]:
    model = DDP(model, device_ids=[ctx["local_rank"]] if device_type == "cuda" else None)


def save(path):
    rngs = tu.gather_rng_states(ctx)  # a collective: every rank calls save()
    if master:
        tu.save_checkpoint(path, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss,
            "config": config, "rng": rngs, "data": {"sampler": "stateless", "seed": seed, "train": train_paths},
            "tokenizer": meta.get("tokenizer_model", ""), "tokenizer_sha256": meta.get("tokenizer_sha256", ""),
        })


# ---- training loop ----------------------------------------------------------------------------------------
log = tu.JsonlLog(os.path.join(out_dir, "log.jsonl"), resume=init_from == "resume") if master else None
t_start = time.time()
t0 = time.time()
running_mfu = -1.0
first_iter = iter_num
resumed = init_from == "resume"
while True:
    lr = tu.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr

    out_of_time = max_minutes and (time.time() - t_start) / 60 >= max_minutes
    last = iter_num >= max_iters or out_of_time
    saved = False
    # evaluate every eval_interval and at the end (not again at the iteration a resumed run starts from)
    if val_bins is not None and (iter_num % eval_interval == 0 or last) and not (resumed and iter_num == first_iter):
        val_loss = tu.estimate_loss(raw_model, val_bins, batch_size, max_seq_len, eval_iters, device, autocast_ctx)
        val_loss = tu.all_reduce_mean(val_loss, ctx)
        tu.check_finite(val_loss, iter_num, out_dir)
        if master:
            print(f"iter {iter_num}: val loss {val_loss:.4f}")
            log.write(iter=iter_num, val_loss=val_loss, lr=lr)
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        if iter_num > first_iter and (improved or always_save_checkpoint):
            save(ckpt_path)
            saved = True
    if last:
        if iter_num > first_iter and not saved:
            save(ckpt_path)  # the final state, so init_from=resume can continue it
        break

    # gradient accumulation: this rank's micro-steps are global micro-steps rank*accum .. rank*accum+accum-1
    loss_sum = 0.0
    for micro in range(accum):
        x, y = tu.get_batch(train_bins, batch_size, max_seq_len, seed, iter_num, ctx["rank"] * accum + micro, device)
        # sync gradients across ranks only on the last micro-step: the others just accumulate locally
        sync = not ctx["ddp"] or micro == accum - 1
        with (nullcontext() if sync else model.no_sync()):
            with autocast_ctx:
                _, loss = model(x, y, return_logits=False)
                loss = loss / accum  # DDP then averages over ranks: the mean over all micro-batches
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    loss_value = tu.all_reduce_mean(float(loss_sum), ctx)
    if not scaler.is_enabled():
        tu.check_finite(loss_value, iter_num, out_dir)  # before the update, so the weights stay good
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if master and iter_num % log_interval == 0:
        tok_s = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(accum * batch_size, dt)  # per GPU: this process's sequences
        if mfu is not None and iter_num - first_iter >= 5:  # skip the compile/warm-up iterations
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = f", mfu {running_mfu * 100:.1f}%" if running_mfu >= 0 else ""
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, {tok_s:,.0f} tok/s{mfu_text}")
        log.write(iter=iter_num, loss=loss_value, lr=lr, dt_ms=dt * 1000, tokens_per_sec=tok_s,
                  mfu=running_mfu if running_mfu >= 0 else None)
    iter_num += 1

if master:
    log.close()
    tu.plot_log(log.path, os.path.join(out_dir, "loss.png"))
    print(f"done: {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}")
tu.cleanup_ddp(ctx)
