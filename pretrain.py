"""
Pretrain the Llama 2 model of model.py on the token files (uint16, or uint32 past 65,535 ids) data_process.py writes.

One process:        python pretrain.py config/demo_cpu.py
Several GPUs:       torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py
Several nodes:      torchrun --nnodes=2 --node_rank=0 --master_addr=IP --master_port=29500 --nproc_per_node=8 pretrain.py ...
Sharded (FSDP2):    torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py --parallel=fsdp
Any global below can be overridden with --key=value after the config files.
"""
import math
import os
import time

import torch

from babyllama import checkpoint as ck, checkpoint_io, dist, optimize, runlog, token_files
from babyllama.atomic import write_json
from babyllama.configurator import configure
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/pretrain"
train_data = "out/data/poetry/train.bin"  # comma-separated paths or globs: several corpora mix by length...
train_weights = ""  # ... or by these weights, one per file (e.g. "0.8,0.2": 80% of the tokens from the first)
val_data = "out/data/poetry/val.bin"
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
init_ckpt = ""  # a new run starts from this checkpoint's weights and architecture (continued pretraining, e.g. of
#                 a model export.py --import_from brought in); "" = random weights
overwrite = False  # a new run (not resume) over an existing out_dir/ckpt.pt: refused unless True
eval_interval = 200
eval_iters = 20
log_interval = 1  # a JSONL row every log_interval iterations (the terminal shows a progress bar)
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
optimizer = "adamw"  # 'adamw', or 'muon': Muon for the blocks' matrices, AdamW for the rest
seed = 1337
# system
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto' (GPU: bf16; CPU: its fast path, babyllama/precision.py), 'float32', 'bfloat16', 'float16'
compile = "auto"  # True, False, or 'auto': what pays on this device (babyllama/precision.py)
num_threads = 0  # CPU threads; 0 = torch's default
max_minutes = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
parallel = "ddp"  # 'ddp': a whole copy per process; 'fsdp': weights, gradients, optimizer sharded (sharded checkpoints)
activation_checkpointing = False  # recompute each block's activations in the backward pass: less memory
cpu_offload = False  # fsdp: keep the shards and the optimizer step in CPU memory
replicas = 1  # fsdp: > 1 = HSDP, shard within world_size / replicas processes (a node), replicate across
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())  # the hyperparameters' names; those the command line set

# ---- set-up -----------------------------------------------------------------------------------------------
run = dist.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile, True, parallel)
device, device_type, master, accum = run.device, run.device_type, run.master, run.accum
ckpt_path = ck.checkpoint_path(out_dir, parallel)  # ckpt.pt, or the sharded ckpt.dcp
# resuming: the architecture (dim, ..., max_seq_len, which the batches use too) becomes the checkpoint's
resume_ckpt, fixed = ck.resume(init_from, "scratch", ckpt_path, device, {k: globals()[k] for k in config_keys},
                               changed, ck.ARCHITECTURE_KEYS, overwrite)
globals().update(fixed)
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
# continued pretraining: the architecture is the starting checkpoint's (asking for another one is an error)
init = checkpoint_io.load(init_ckpt) if resume_ckpt is None and init_ckpt else None
if init is not None:
    if "model" not in init:
        raise SystemExit(f"{init_ckpt} holds LoRA adapters, not whole weights: continue pretraining from the merged "
                         f"model its run wrote (merged.pt)")
    globals().update(ck.init_architecture(ModelArgs(**init["model_args"]), changed, init_ckpt))
lr_decay_iters = lr_decay_iters or max_iters

# ---- data -------------------------------------------------------------------------------------------------
train_bins, train_paths, meta = token_files.open_bins(train_data, vocab_size, min_tokens=max_seq_len + 1)  # checked
val_bins = token_files.open_bins(val_data, vocab_size, like=meta, min_tokens=max_seq_len + 1)[0] if val_data else None
try:  # data mixing: each file's share of the windows
    mix = [float(w) for w in train_weights.split(",") if w] or None
except ValueError:
    mix = [-1.0]
if mix is not None and (len(mix) != len(train_paths) or not all(0 <= w < math.inf for w in mix) or sum(mix) <= 0):
    raise SystemExit(f"train_weights={train_weights!r}: want one weight >= 0 per training file, not all 0 "
                     f"({len(train_paths)} files: {', '.join(train_paths)})")
if not vocab_size:
    if "vocab_size" not in meta:
        raise SystemExit(f"vocab_size not set and no vocab_size in the meta.json beside {train_paths[0]}")
    vocab_size = meta["vocab_size"]
tokens_per_iter = gradient_accumulation_steps * batch_size * max_seq_len
config = {k: globals()[k] for k in config_keys}  # what this run really uses: the checkpoint records it
ckpt_fields = dict(config=config, data={"sampler": "stateless", "seed": seed, "train": train_paths},
                   tokenizer=meta.get("tokenizer_model", ""), tokenizer_sha256=meta.get("tokenizer_sha256", ""))
if master:
    print(f"{tokens_per_iter:,} tokens per iteration "
          f"({run.world_size} x {accum} micro-steps x {batch_size} x {max_seq_len})")
    print(f"train tokens: {sum(len(b) for b in train_bins):,} in {len(train_bins)} file(s)"
          + (f", mixed {' : '.join(f'{w / sum(mix):.0%}' for w in mix)}" if mix else ""))

# ---- model ------------------------------------------------------------------------------------------------
model_args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None,
                  vocab_size=vocab_size, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier or None,
                  norm_eps=norm_eps, max_seq_len=max_seq_len, dropout=dropout, tie_embeddings=tie_embeddings,
                  rope_theta=rope_theta)
torch.manual_seed(seed)  # the same initial weights on every process
if init is not None:
    model_args = dict(model_args, **{k: init["model_args"].get(k, d) for k, d in  # what an imported model may have
                                     (("hidden_dim", None), ("attention_bias", False), ("rope_scaling", None))})
    if init.get("tokenizer_sha256") and meta.get("tokenizer_sha256") and init["tokenizer_sha256"] != meta["tokenizer_sha256"]:
        raise SystemExit(f"{init_ckpt} was trained with another tokenizer than {train_paths[0]}'s (sha256 differs)")
model = Transformer(ModelArgs(**model_args))
if init is not None:
    model.load_state_dict(init["model"])
    del init
    if master:
        print(f"continued pretraining from the weights of {init_ckpt}")
if resume_ckpt is not None and "model" in resume_ckpt:  # (a sharded checkpoint loads once the model is sharded)
    model.load_state_dict(resume_ckpt["model"])
if resume_ckpt is not None and master:
    print(f"resumed from {ckpt_path} at iteration {iter_num}")
model.to(device)
raw_model = model
if master:
    print(f"parameters: {raw_model.num_params() / 1e6:.2f}M")
model = dist.parallelize(model, run, activation_checkpointing, cpu_offload, replicas)  # compile, DDP or FSDP
optim = ck.training_optimizer(raw_model, resume_ckpt, run, seed, weight_decay, learning_rate, (beta1, beta2), optimizer)

# ---- training loop ----------------------------------------------------------------------------------------
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optim, log, eval_interval,
                               always_save_checkpoint, ceiling=math.log(vocab_size), model_args=model_args,
                               **ckpt_fields)
del resume_ckpt
timer = runlog.StepTimer()
progress = runlog.Progress("pretrain", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x {tokens_per_iter:,} "
                       f"tokens = {(max_iters - iter_num) * tokens_per_iter:,} tokens, validation every "
                       f"{eval_interval} ({eval_iters} sampled batches)", enabled=master)
running_mfu = -1.0
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_loss = None  # without validation data the checkpoint is still written every eval_interval
        if val_bins is not None:
            # eval_iters fixed batches of random windows: an estimate; eval.py --mode=loss reads the whole file
            val_loss = token_files.estimate_loss(raw_model, val_bins, batch_size, max_seq_len, eval_iters, device,
                                        run.autocast)
            val_loss = dist.all_reduce_mean(val_loss, run)
            log.write(f"iter {iter_num}: val loss {val_loss:.4f} (estimate: {eval_iters} x {batch_size} windows)",
                      iter=iter_num, val_loss=val_loss, lr=lr)
        checkpointer.after_eval(iter_num, val_loss)
        timer.skip()  # evaluation and saving are not training time
    if last:
        break

    # gradient accumulation: this process's micro-steps are global micro-steps rank*accum .. rank*accum+accum-1
    loss_sum = 0.0
    for micro in range(accum):
        x, y = token_files.get_batch(train_bins, batch_size, max_seq_len, seed, iter_num, run.rank * accum + micro,
                                     device, weights=mix)
        # sync gradients across processes only on the last micro-step: the others just accumulate locally
        with dist.gradient_sync(model, micro == accum - 1):
            with run.autocast:
                _, loss = model(x, y, return_logits=False)
                # every micro-batch holds batch_size x max_seq_len scored tokens, so this, averaged by DDP over
                # processes, is the sum of all token losses / their global count however the batch is split
                loss = loss / accum
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    loss_value = dist.all_reduce_mean(float(loss_sum), run)
    if not run.scaler.is_enabled():
        checkpointer.check_train_loss(iter_num, loss_value)  # before the update, so the weights stay good
    optimize.optimizer_step(optim, run.scaler, grad_clip)

    dt = timer.lap(tokens_per_iter)
    progress.step(loss_value, tokens_per_iter, dt)
    if iter_num % log_interval == 0:
        mfu = raw_model.estimate_mfu(accum * batch_size, dt)  # per GPU: this process's sequences
        if mfu is not None and timer.laps > 5:  # skip the compile/warm-up iterations
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        log.write(iter=iter_num, loss=loss_value, lr=lr, dt_ms=dt * 1000, tokens_per_sec=tokens_per_iter / dt,
                  mfu=running_mfu if running_mfu >= 0 else None)
    iter_num += 1
progress.close()
checkpointer.at_end(iter_num)  # the final state, so init_from=resume can continue it

if master:
    summary = dict(iter=iter_num, params=raw_model.num_params(), best_val_loss=checkpointer.best_val_loss,
                   wall_seconds=round(time.time() - timer.start, 1), **runlog.throughput(timer, device_type))
    log.write(summary=summary)
    write_json(os.path.join(out_dir, "summary.json"), summary)  # written last: the run finished
    runlog.plot_log(log.path, os.path.join(out_dir, "loss.png"), title="pretraining loss (nats per token)")
    print(f"summary: {summary}")
    print(f"done: {iter_num} iterations in {(time.time() - timer.start) / 60:.1f} min; checkpoint {ckpt_path}")
log.close()
del model  # the DDP/FSDP wrapper goes before the process group (see cleanup_ddp)
dist.cleanup_ddp(run)
