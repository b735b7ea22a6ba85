"""
A reward model (Ouyang et al. 2022, InstructGPT's RM): the SFT model with one linear layer reading the final
hidden state of the last real token of prompt + reply, trained on the preference pairs dpo.py reads with the
pairwise Bradley-Terry loss
    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected) - margin)
summed over the pairs of an iteration and divided by their count over all micro-steps and processes. Logged:
loss, accuracy (share of pairs with r_chosen > r_rejected) and mean margin r_chosen - r_rejected, on training
batches and on held-out pairs, with PNGs. Full fine-tuning (the body and the head) or, with lora_rank > 0, LoRA
adapters on the body and the head (the rest frozen).

    python reward_model.py --init_ckpt=out/demo/sft/ckpt.pt --train_data=out/demo/dpo_data/train.jsonl \\
        --val_data=out/demo/dpo_data/val.jsonl --out_dir=out/demo/reward
    torchrun --standalone --nproc_per_node=8 reward_model.py ...

Use it: babyllama.reward_model.load_reward_model(path) and score_conversations(rm, tok, conversations)
(batched scalars); grpo.py and ppo.py with --reward=model.
"""
import os
import time

import torch

from babyllama import checkpoint as ck, dist, models, optimize, runlog
from babyllama.atomic import write_json
from babyllama.configurator import configure
from babyllama.inference import checkpoint_tokenizer
from babyllama.pairs import PairBatches, tokenize_pair
from babyllama.preferences import load_preferences
from babyllama.reward_model import RewardModel, bt_loss

# -----------------------------------------------------------------------------------------------------------
out_dir = "out/reward"
train_data = "out/dpo_data/train.jsonl"
val_data = "out/dpo_data/val.jsonl"
init_from = "sft"  # 'sft': start from init_ckpt; 'resume': continue out_dir/ckpt.pt
overwrite = False
init_ckpt = "out/sft/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt, or its copy beside init_ckpt
eval_interval = 50
log_interval = 1
always_save_checkpoint = True
margin = 0.0  # the Bradley-Terry margin (Llama 2's RM uses one per preference strength)
max_seq_len = 0  # 0 = the checkpoint's context
batch_size = 8  # pairs per micro-batch
gradient_accumulation_steps = 1
max_iters = 200
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
seed = 1337
device = "auto"
dtype = "auto"
compile = False
num_threads = 0
max_minutes = 0.0
# LoRA (lora_rank = 0: full fine-tuning)
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())

run = dist.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile, False)
device, device_type, master, accum = run.device, run.device_type, run.master, run.accum
ckpt_path = ck.checkpoint_path(out_dir, "ddp")  # ckpt.pt: no FSDP here (no `parallel` setting)
# resuming: the starting checkpoint, context length and LoRA shape become the checkpoint's
resume_ckpt, fixed = ck.resume(init_from, "sft", ckpt_path, device, {k: globals()[k] for k in config_keys},
                               changed, ck.FINETUNE_KEYS, overwrite)
globals().update(fixed)
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
lr_decay_iters = lr_decay_iters or max_iters

# ---- model: the SFT body and a scalar head ---------------------------------------------------------------------
body, model_args, _, init = models.finetune_model(init_ckpt, None, device, seed, max_seq_len, 0.0, lora_rank,
                                                  lora_alpha, lora_dropout, lora_targets)
torch.manual_seed(seed)  # the same head on every process
raw_model = RewardModel(body).to(device)
if resume_ckpt is not None:
    raw_model.load_state_dict(resume_ckpt["model"])
max_seq_len = model_args["max_seq_len"]
# AdamW over the trainable parameters (with LoRA: the adapters and the head); resumed with its RNG and scaler
trainable = [p for p in raw_model.parameters() if p.requires_grad]
optim = ck.training_optimizer(raw_model, resume_ckpt, run, seed, weight_decay, learning_rate, (beta1, beta2))
model = dist.wrap_ddp(raw_model, run)

# ---- data -------------------------------------------------------------------------------------------------
tok = checkpoint_tokenizer(init, init_ckpt, model_args["vocab_size"], tokenizer_model)
del init
train_pairs, train_counts = load_preferences(train_data)
val_pairs, val_counts = load_preferences(val_data) if val_data else ([], {})
train_items = [tokenize_pair(tok, p, max_seq_len - 1)[:3] for p in train_pairs]
val_items = [tokenize_pair(tok, p, max_seq_len - 1)[:3] for p in val_pairs]
if not train_items:
    raise SystemExit(f"no usable pairs in {train_data}: {dict(train_counts)}")
batches = PairBatches(len(train_items), batch_size, seed)
if master:
    print(f"reward model on {init_ckpt}: {raw_model.body.num_params() / 1e6:.2f}M + head, trainable "
          f"{sum(p.numel() for p in trainable):,}" + (f" (LoRA rank {lora_rank})" if lora_rank else "") +
          f"; train pairs {dict(train_counts)}; held-out pairs {dict(val_counts)}")


def pair_rewards(net, idx, items):
    """(r_chosen, r_rejected) (B,) of the pairs idx: chosen and rejected sequences in one forward pass."""
    seqs = [items[i][0] + items[i][1] for i in idx] + [items[i][0] + items[i][2] for i in idx]
    with run.autocast:
        r = net(seqs, device)
    return r[:len(idx)], r[len(idx):]


@torch.no_grad()
def evaluate():
    raw_model.eval()
    losses, correct, margins = [], [], []
    for s in range(0, len(val_items), batch_size):
        idx = list(range(s, min(s + batch_size, len(val_items))))
        rc, rr = pair_rewards(raw_model, idx, val_items)
        losses += bt_loss(rc, rr, margin).tolist()
        correct += (rc > rr).tolist()
        margins += (rc - rr).tolist()
    raw_model.train()
    n = len(losses)
    return {"loss": sum(losses) / n, "accuracy": sum(correct) / n, "margin": sum(margins) / n}


# ---- training loop ----------------------------------------------------------------------------------------
config = {k: globals()[k] for k in config_keys}
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optim, log, eval_interval,
                               always_save_checkpoint, model_args=model_args, config=config, init_ckpt=init_ckpt,
                               tokenizer=tok.model_path, tokenizer_sha256=tok.sha256(),
                               data={"sampler": "stateless", "seed": seed, "train": train_data})
del resume_ckpt
first_eval = last_eval = None
timer = runlog.StepTimer()
progress = runlog.Progress("reward model", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x "
                       f"{batch_size * gradient_accumulation_steps} pairs, held-out evaluation every {eval_interval}",
                       enabled=master)
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_loss = None
        if val_items:
            ev = evaluate()
            first_eval = ev if first_eval is None and iter_num == 0 else first_eval
            last_eval = ev
            val_loss = dist.all_reduce_mean(ev["loss"], run)
            log.write(f"iter {iter_num}: held-out loss {val_loss:.4f}, accuracy {ev['accuracy']:.3f}, "
                      f"margin {ev['margin']:.3f}", iter=iter_num, **{f"val/{k}": v for k, v in ev.items()})
        checkpointer.after_eval(iter_num, val_loss)
        timer.skip()
    if last:
        break
    micro_idx = [batches.get(iter_num * gradient_accumulation_steps + run.rank * accum + m) for m in range(accum)]
    n_pairs = dist.all_reduce_sum(sum(len(idx) for idx in micro_idx), run)
    loss_sum, correct, margin_sum, n_tok = 0.0, 0, 0.0, 0
    for micro, idx in enumerate(micro_idx):
        with dist.gradient_sync(model, micro == accum - 1):  # reduce gradients on the last micro-step only
            rc, rr = pair_rewards(model, idx, train_items)
            loss = bt_loss(rc, rr, margin).sum() / n_pairs
            run.scaler.scale(loss * run.world_size).backward()
        loss_sum += float(loss.detach())
        correct += int((rc > rr).sum())
        margin_sum += float((rc - rr).sum().detach())
        n_tok += sum(len(train_items[i][0]) * 2 + len(train_items[i][1]) + len(train_items[i][2]) for i in idx)
    metrics = {"loss": dist.all_reduce_sum(loss_sum, run), "accuracy": dist.all_reduce_sum(correct, run) / n_pairs,
               "margin": dist.all_reduce_sum(margin_sum, run) / n_pairs}
    if not run.scaler.is_enabled():  # fp16's scaler skips an overflowing step by itself
        checkpointer.check_train_loss(iter_num, metrics["loss"])
    optimize.optimizer_step(optim, run.scaler, grad_clip)
    n_tok = int(dist.all_reduce_sum(n_tok, run))
    dt = timer.lap(n_tok)
    progress.step(metrics["loss"], n_tok, dt)
    if iter_num % log_interval == 0:
        log.write(iter=iter_num, lr=lr, dt_ms=dt * 1000, tokens_per_sec=n_tok / dt, **metrics)
    iter_num += 1
progress.close()
checkpointer.at_end(iter_num)

if master:
    summary = dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1), margin=margin,
                   **runlog.throughput(timer, device_type))
    if first_eval and last_eval:
        summary["held_out"] = {"pairs": len(val_items), "before": first_eval, "after": last_eval}
        print(f"held-out accuracy over {len(val_items)} pairs: {first_eval['accuracy']:.3f} -> "
              f"{last_eval['accuracy']:.3f} (margin {first_eval['margin']:.3f} -> {last_eval['margin']:.3f})")
    log.write(summary=summary)
    runlog.plot_log(log.path, os.path.join(out_dir, "loss.png"), (("loss", "train"), ("val/loss", "held-out")),
                    title="reward model: Bradley-Terry loss")
    runlog.plot_log(log.path, os.path.join(out_dir, "accuracy.png"), (("accuracy", "train"),
                    ("val/accuracy", "held-out")), title="reward model: accuracy (r_chosen > r_rejected)")
    log.close()
    write_json(os.path.join(out_dir, "summary.json"), summary)
del model
dist.cleanup_ddp(run)
