"""
Supervised fine-tuning (chat) of a pretrained checkpoint on conversations written by sft_data_process.py.

One process:   python sft.py config/sft_demo.py
LoRA:          python sft.py config/sft_demo.py --lora_rank=8
Several GPUs:  torchrun --standalone --nproc_per_node=8 sft.py --init_ckpt=out/pretrain/ckpt.pt ...
Any global below can be overridden with --key=value after the config files.

Each conversation goes through the chat template (tokenizer/chat_template.py); the loss is taken only on the
assistant tokens of every turn and the <|end|> closing each, never on system/user turns, role markers or
padding. Batches are right-padded to their longest sample, or (pack=True) several samples share a row of
max_seq_len tokens with a block-diagonal causal mask and positions restarting at 0, so packed samples neither
attend to nor are scored across one another. Which samples form which batch depends only on (seed, step,
micro-step), so a resumed run and a DDP run see the batches of an uninterrupted single-process run.
With lora_rank > 0 only LoRA adapters train (babyllama/lora.py); ckpt.pt then holds the adapter only (plus optimizer
state) and names its base checkpoint, and merged.pt holds the merged model for eval.py and export.
The pieces (batches, packing, the loss) are in babyllama/chat_batches.py; checkpoints in babyllama/checkpoint.py,
the starting model in babyllama/models.py.
"""
import math
import os
import time

from babyllama import checkpoint as ck, dist, models, optimize, runlog
from babyllama.atomic import write_json
from babyllama.chat_batches import (ConversationBatches, PackedLM, scored_tokens, sft_loss, sft_validation_loss,
                                    tokenize_conversations)
from babyllama.configurator import configure
from babyllama.conversations import load_conversations
from babyllama.inference import checkpoint_tokenizer
from tokenizer.chat_template import IGNORE

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/sft"
train_data = "out/sft_data/train.jsonl"
val_data = "out/sft_data/val.jsonl"  # "" = no validation
init_from = "pretrain"  # 'pretrain': start from the weights of init_ckpt; 'resume': continue out_dir/ckpt.pt
overwrite = False  # a new run (not resume) over an existing out_dir/ckpt.pt: refused unless True
init_ckpt = "out/pretrain/ckpt.pt"  # a pretrain checkpoint, or an SFT one (full or LoRA) to continue from
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt, or its copy beside init_ckpt
eval_interval = 100
eval_iters = 0  # validation batches; 0 = the whole held-out split
log_interval = 1  # a JSONL row every log_interval iterations (the terminal shows a progress bar)
always_save_checkpoint = True
# data
max_seq_len = 0  # 0 = the checkpoint's context; samples are cut to max_seq_len + 1 tokens
pack = False  # True: pack several samples per row (block-diagonal mask); False: pad to the batch's longest
# training
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 500
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 0  # 0 = max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
optimizer = "adamw"  # or 'muon' (Muon for the blocks' matrices, AdamW for the rest)
dropout = 0.0
seed = 1337
# LoRA (lora_rank = 0: full fine-tuning)
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
save_merged = True  # LoRA: also write merged.pt (base + adapter folded) at the end
# system
device = "auto"
dtype = "auto"
compile = "auto"  # True, False, or 'auto': what pays on this device (babyllama/precision.py)
num_threads = 0
max_minutes = 0.0
parallel = "ddp"  # 'ddp', or 'fsdp': weights, gradients and optimizer state sharded over the processes (pretrain.py)
activation_checkpointing = False  # recompute each block's activations in the backward pass (less memory)
cpu_offload = False  # fsdp: keep the shards and the optimizer step in CPU memory
replicas = 1  # fsdp: > 1 = HSDP (shard within world_size / replicas processes, replicate across)
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())  # the hyperparameters' names; those the command line set

# ---- set-up -----------------------------------------------------------------------------------------------
run = dist.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile, pack, parallel)
device, device_type, master, accum = run.device, run.device_type, run.master, run.accum
ckpt_path = ck.checkpoint_path(out_dir, parallel)  # ckpt.pt, or the sharded ckpt.dcp
# resuming: the starting checkpoint, context length and LoRA shape become the checkpoint's
resume_ckpt, fixed = ck.resume(init_from, "pretrain", ckpt_path, device, {k: globals()[k] for k in config_keys},
                               changed, ck.FINETUNE_KEYS, overwrite)
globals().update(fixed)
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
lr_decay_iters = lr_decay_iters or max_iters

# ---- model ------------------------------------------------------------------------------------------------
raw_model, model_args, _, init = models.finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len, dropout,
                                                   lora_rank, lora_alpha, lora_dropout, lora_targets)
max_seq_len = model_args["max_seq_len"]
n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
model = PackedLM(raw_model) if pack else raw_model  # packed rows need explicit positions and masks
model = dist.parallelize(raw_model, run, activation_checkpointing, cpu_offload, replicas, outer=model)
optim = ck.training_optimizer(raw_model, resume_ckpt, run, seed, weight_decay, learning_rate, (beta1, beta2),
                              optimizer)
if master:
    print(f"from {init_ckpt}"
          + (f" (resumed at iteration {iter_num})" if resume_ckpt is not None else ""))
    print(f"parameters: {raw_model.num_params() / 1e6:.2f}M, trainable: {n_trainable:,}"
          + (f" (LoRA rank {lora_rank}, alpha {lora_alpha}, targets {lora_targets})" if lora_rank else ""))

# ---- data -------------------------------------------------------------------------------------------------
tok = checkpoint_tokenizer(init, init_ckpt, model_args["vocab_size"], tokenizer_model)
del init  # the starting checkpoint: only its tokenizer was still needed
pad_id = max(tok.pad_id, 0)  # a tokenizer without <pad> pads with 0: padding is never scored anyway
train_samples, dropped = tokenize_conversations(load_conversations(train_data), tok, max_seq_len)
val_samples = tokenize_conversations(load_conversations(val_data), tok, max_seq_len)[0] if val_data else []
if not train_samples:
    raise SystemExit(f"{train_data}: no conversation with a scored token ({dropped} dropped): nothing to train on")
batches = ConversationBatches(train_samples, batch_size, gradient_accumulation_steps, seed, pack, max_seq_len, pad_id)
if master:
    scored = sum(int((s[1][1:] != IGNORE).sum()) for s in train_samples)
    print(f"train: {len(train_samples):,} conversations ({dropped} without scored tokens dropped), "
          f"{int(batches.lengths.sum()):,} tokens of which {scored:,} scored; val: {len(val_samples):,}; "
          + (f"packed into {len(batches.units(0)):,} rows of {max_seq_len}" if pack else "padded batches"))

# ---- training loop ----------------------------------------------------------------------------------------
config = {k: globals()[k] for k in config_keys}  # what this run really uses: the checkpoint records it
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optim, log, eval_interval,
                               always_save_checkpoint, ceiling=math.log(model_args["vocab_size"]),
                               model_args=model_args, config=config, init_ckpt=init_ckpt,
                               tokenizer=tok.model_path, tokenizer_sha256=tok.sha256(),
                               data={"sampler": "stateless", "seed": seed, "train": train_data})
del resume_ckpt
timer = runlog.StepTimer()
n_val = min(len(val_samples), eval_iters * batch_size) if eval_iters else len(val_samples)
progress = runlog.Progress("sft", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x "
                       f"{batch_size * gradient_accumulation_steps} conversations, validation every {eval_interval} "
                       f"on {n_val:,} held-out conversations", enabled=master)
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_loss = None  # without validation data the checkpoint is still written every eval_interval
        if val_samples:
            val_loss = sft_validation_loss(raw_model, val_samples, batch_size, eval_iters, pad_id, device,
                                           run.autocast)
            val_loss = dist.all_reduce_mean(val_loss, run)  # every process decides on the same number
            log.write(f"iter {iter_num}: val loss {val_loss:.4f}", iter=iter_num, val_loss=val_loss, lr=lr)
        checkpointer.after_eval(iter_num, val_loss)
        timer.skip()  # evaluation and saving are not training time
    if last:
        break

    # the objective is the sum of the token losses over the whole iteration (every micro-step of every process)
    # divided by its scored-token count, so batch x accumulation x processes can be traded with the same gradient
    micro_batches = [batches.get(iter_num, run.rank * accum + micro, device) for micro in range(accum)]
    scored = [scored_tokens(b) for b, _ in micro_batches]  # counted on the CPU, before the copies to device
    n_scored = dist.all_reduce_sum(sum(scored), run)
    loss_sum, n_tok = 0.0, 0
    for micro, (batch, put) in enumerate(micro_batches):
        n_tok += batch.pop("n_tokens")
        batch = {k: put(v) for k, v in batch.items()}
        with dist.gradient_sync(model, micro == accum - 1):  # reduce gradients on the last micro-step only
            with run.autocast:
                loss = sft_loss(model, batch) * scored[micro] / n_scored  # this micro-batch's share
            run.scaler.scale(loss * run.world_size).backward()  # DDP averages the processes' gradients
        loss_sum += loss.detach()
    loss_value = dist.all_reduce_sum(float(loss_sum), run)
    if not run.scaler.is_enabled():
        checkpointer.check_train_loss(iter_num, loss_value)
    optimize.optimizer_step(optim, run.scaler, grad_clip)

    n_tok = int(dist.all_reduce_sum(n_tok, run))
    dt = timer.lap(n_tok)
    progress.step(loss_value, n_tok, dt)
    if iter_num % log_interval == 0:
        log.write(iter=iter_num, loss=loss_value, lr=lr, dt_ms=dt * 1000, tokens_per_sec=n_tok / dt)
    iter_num += 1
progress.close()
checkpointer.at_end(iter_num)  # the final state, so init_from=resume can continue it

# ---- summary and the merged model -------------------------------------------------------------------------
final = models.gathered_model(raw_model, run) if lora_rank and save_merged else None  # (FSDP: gathers the shards)
if master:
    summary = dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1), trainable_params=n_trainable,
                   best_val_loss=checkpointer.best_val_loss, **runlog.throughput(timer, device_type))
    log.write(summary=summary)
    log.close()
    runlog.plot_log(log.path, os.path.join(out_dir, "loss.png"), title="SFT loss (nats per scored token)")
    print(f"summary: {summary}")
    if lora_rank and save_merged:
        models.save_merged(os.path.join(out_dir, "merged.pt"), final, iter_num=iter_num, **checkpointer.fields)
        print(f"merged model: {os.path.join(out_dir, 'merged.pt')}")
    write_json(os.path.join(out_dir, "summary.json"), summary)  # written last: the run finished
    print(f"done: {iter_num} iterations in {(time.time() - timer.start) / 60:.1f} min; checkpoint {ckpt_path}")
del model, final  # the DDP/FSDP wrapper goes before the process group (see cleanup_ddp)
dist.cleanup_ddp(run)
