"""
Direct Preference Optimization (Rafailov et al. 2023) and its common variants, on pairs (prompt, chosen reply,
rejected reply) that babyllama/preferences.py reads; starts from an SFT checkpoint.

One process:   python dpo.py config/dpo_demo.py
LoRA:          python dpo.py config/dpo_demo.py --lora_rank=8   (the reference is the base, adapters off)
Cached ref:    python dpo.py config/dpo_demo.py --reference=cached
Several GPUs:  torchrun --standalone --nproc_per_node=8 dpo.py --init_ckpt=out/sft/ckpt.pt --train_data=...
Any global below can be overridden with --key=value after the config files.

The idea. A policy pi (being trained) and a frozen reference pi_ref (the starting SFT model). For a pair,
the log-probability of each whole reply given the prompt, summed over the reply's tokens only:
    logp(y|x) = sum_t log pi(y_t | x, y_<t)
DPO's implicit reward of a reply is r = beta * (logp_pi(y|x) - logp_ref(y|x)), and the loss asks the chosen
reply's reward to exceed the rejected one's:
    loss = -log sigmoid(r_chosen - r_rejected)
At step 0 pi == pi_ref, every reward is 0 and the loss is log 2 = 0.693. The logged metrics (as TRL names them):
rewards/chosen, rewards/rejected (mean r), rewards/margins (mean r_c - r_r), rewards/accuracies (share of pairs
with r_c > r_r), logps/chosen, logps/rejected (the policy's mean summed log-probs). Healthy DPO: margins and
accuracies rise; watch logps/chosen too: when both log-probs fall, the policy is drifting away from the data.
Also logged: logps/accuracy and logps/margin, the model's own preference without a reference (share of pairs
with logp(chosen) > logp(rejected), mean difference): on the held-out pairs at iteration 0 they are the SFT
model's, at the end the DPO model's (the before/after comparison the run prints; per pair kind when labelled).

Variants (loss_type), h = (logp_pi(c) - logp_ref(c)) - (logp_pi(r) - logp_ref(r)):
    sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)   (DPO; eps = label_smoothing > 0 is conservative DPO)
    ipo      (h - 1/(2 beta))^2                            (IPO, Azar et al. 2023)
    hinge    max(0, 1 - beta h)                            (SLiC)
    simpo    -log s(beta (avg_c - avg_r) - gamma)          (SimPO; reference-free, avg = logp / reply tokens)
    orpo     -avg_c - beta log s(log odds(c) - log odds(r)), odds = p / (1 - p), p = exp(avg)  (ORPO; ref-free)
sft_weight > 0 adds sft_weight * (mean NLL of the chosen replies' tokens) to any of them.

Reference (reference): 'model' keeps a frozen copy of the starting weights (with LoRA: the same model with its
adapters switched off, no copy); 'cached' computes the reference log-probs once before training, with the
policy itself before its first update, for the held-out pairs and every training pair the run will visit (the
sampler is stateless, so they are known in advance), saves them in out_dir/ref_logps.pt and keeps no reference
model at all: one forward pass less per step and no second copy of the weights. simpo and orpo need none.
Chosen and rejected go through the model in one forward pass (2B rows: chosen first), right-padded; the
targets are -1 on the prompt and padding, so only reply tokens (and the <|end|> closing the reply) count.
The pieces (pair batches, log-probs, the reference, the losses) are in babyllama/pairs.py; checkpoints in
babyllama/checkpoint.py, the starting model in babyllama/models.py.
"""
from contextlib import nullcontext
import math
import os
import time

import torch

from babyllama import checkpoint as ck, checkpoint_io, dist, models, optimize, runlog
from babyllama.atomic import write_json
from babyllama.configurator import configure
from babyllama.inference import checkpoint_tokenizer
from babyllama.lora import adapters_off
from babyllama.models import frozen_copy
from babyllama.pairs import (LOSS_TYPES, REFERENCE_FREE, PairBatches, Reference, evaluate_pairs, pair_batch_loss,
                             pair_logps, tokenize_pair)
from babyllama.preferences import load_preferences
from tokenizer.chat_template import decode_reply, encode_prompt

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/dpo"
train_data = "out/dpo_data/train.jsonl"  # comma-separated; .json, .jsonl or .parquet in any format above
val_data = "out/dpo_data/val.jsonl"  # held-out pairs; "" = none
init_from = "sft"  # 'sft': start from init_ckpt; 'resume': continue out_dir/ckpt.pt
overwrite = False  # a new run (not resume) over an existing out_dir/ckpt.pt: refused unless True
init_ckpt = "out/sft/ckpt.pt"  # an SFT checkpoint (full or LoRA), or any checkpoint this project writes
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt, or its copy beside init_ckpt
eval_interval = 50
log_interval = 1
always_save_checkpoint = True  # save at every evaluation; otherwise only when the held-out loss improves
n_samples = 4  # held-out prompts generated from before and after training, at the end (0 = none)
# DPO
loss_type = "sigmoid"  # 'sigmoid' (DPO), 'ipo', 'hinge', 'simpo', 'orpo'
beta = 0.1
label_smoothing = 0.0  # > 0 with sigmoid: conservative DPO (cDPO); also used by simpo
simpo_gamma = 0.5  # SimPO's target reward margin
sft_weight = 0.0  # > 0: add this times the NLL of the chosen reply
reference = "model"  # 'model' (frozen copy; adapters off with LoRA) or 'cached'; ignored by simpo/orpo
# data
max_seq_len = 0  # 0 = the checkpoint's context; prompt + reply are cut to max_seq_len + 1 tokens
# training
batch_size = 8  # pairs per micro-batch (2 * batch_size sequences per forward pass)
gradient_accumulation_steps = 1
max_iters = 200
learning_rate = 5e-6
min_lr = 5e-7
warmup_iters = 10
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
save_merged = True  # LoRA: also write merged.pt at the end
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
if loss_type not in LOSS_TYPES:
    raise SystemExit(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
if reference not in ("model", "cached"):
    raise SystemExit(f"reference must be 'model' or 'cached', not {reference!r}")

# ---- set-up -----------------------------------------------------------------------------------------------
run = dist.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile, False, parallel)
device, device_type, master, accum = run.device, run.device_type, run.master, run.accum
ckpt_path = ck.checkpoint_path(out_dir, parallel)  # ckpt.pt, or the sharded ckpt.dcp
# resuming: the starting checkpoint, context length and LoRA shape become the checkpoint's, and with them the
# reference (a LoRA policy is its own reference, adapters off)
resume_ckpt, fixed = ck.resume(init_from, "sft", ckpt_path, device, {k: globals()[k] for k in config_keys},
                               changed, ck.FINETUNE_KEYS, overwrite)
globals().update(fixed)
ref_mode = "none" if loss_type in REFERENCE_FREE else reference
if ref_mode == "model" and lora_rank:
    ref_mode = "adapters_off"
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
lr_decay_iters = lr_decay_iters or max_iters

# ---- model: the policy --------------------------------------------------------------------------------------
raw_model, model_args, start_state, init = models.finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len,
                                                             dropout, lora_rank, lora_alpha, lora_dropout, lora_targets)
max_seq_len = model_args["max_seq_len"]
n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
model = dist.parallelize(raw_model, run, activation_checkpointing, cpu_offload, replicas)  # compile, DDP or FSDP
optim = ck.training_optimizer(raw_model, resume_ckpt, run, seed, weight_decay, learning_rate, (beta1, beta2),
                              optimizer)
if master:
    print(f"from {init_ckpt}"
          + (f" (resumed at iteration {iter_num})" if resume_ckpt is not None else ""))
    print(f"loss {loss_type}, beta {beta}, reference: {ref_mode}; parameters {raw_model.num_params() / 1e6:.2f}M, "
          f"trainable {n_trainable:,}" + (f" (LoRA rank {lora_rank}, alpha {lora_alpha})" if lora_rank else ""))

# ---- data -------------------------------------------------------------------------------------------------
tok = checkpoint_tokenizer(init, init_ckpt, model_args["vocab_size"], tokenizer_model)
del init  # the starting checkpoint: only its tokenizer was still needed
pad_id = max(tok.pad_id, 0)  # a tokenizer without <pad> pads with 0: padding is never scored anyway
train_pairs, train_counts = load_preferences(train_data)
val_pairs, val_counts = load_preferences(val_data) if val_data else ([], {})
train_tok = [tokenize_pair(tok, p, max_seq_len) for p in train_pairs]
val_tok = [tokenize_pair(tok, p, max_seq_len) for p in val_pairs]
train_counts["truncated"], val_counts["truncated"] = sum(t[3] for t in train_tok), sum(t[3] for t in val_tok)
train_items, val_items = [t[:3] for t in train_tok], [t[:3] for t in val_tok]  # (prompt, chosen, rejected) ids
if not train_items:
    raise SystemExit(f"no usable pairs in {train_data}: {dict(train_counts)}")
batches = PairBatches(len(train_items), batch_size, seed)
val_kinds = [p.get("kind") for p in val_pairs]
if master:
    print(f"train pairs: {dict(train_counts)}; held-out pairs: {dict(val_counts)}")

# ---- the reference ------------------------------------------------------------------------------------------
# 'model': the starting weights, frozen. 'adapters_off': the LoRA policy with its adapters switched off.
# 'cached': the reference log-probs of every pair this run will visit (the sampler is stateless, so they are
# known in advance) and of the held-out pairs, computed once and kept in out_dir/ref_logps.pt; no copy of the
# weights. The policy itself fills the cache before its first update (only a resumed run missing part of its
# cache needs the starting weights again).
ref_cache, cache_seconds = None, 0.0
if ref_mode == "cached":
    cache_path = os.path.join(out_dir, "ref_logps.pt")
    key = {"init_ckpt": init_ckpt, "train": train_data, "val": val_data, "n": [len(train_items), len(val_items)],
           "max_seq_len": max_seq_len, "dtype": run.dtype}
    cached = checkpoint_io.load(cache_path) if os.path.exists(cache_path) else None
    if cached is not None and cached["key"] == key:
        ref_cache = cached["logps"]
    else:  # NaN marks pairs not computed yet
        ref_cache = {split: (torch.full((n,), math.nan), torch.full((n,), math.nan))
                     for split, n in (("train", len(train_items)), ("val", len(val_items)))}
    visit = {i for g in range(iter_num * gradient_accumulation_steps, max_iters * gradient_accumulation_steps)
             for i in batches.get(g)}
    todo = {"train": [i for i in sorted(visit) if math.isnan(ref_cache["train"][0][i])],
            "val": [i for i in range(len(val_items)) if math.isnan(ref_cache["val"][0][i])]}
    n_todo = len(todo["train"]) + len(todo["val"])
    if n_todo:
        t = time.time()
        if resume_ckpt is None:  # before the first update the policy is the reference
            net, off = raw_model, (adapters_off(raw_model) if lora_rank else nullcontext())
        else:
            net, off = frozen_copy(model_args, start_state, device), nullcontext()
        net.eval()
        with off:
            for split, items in (("train", train_items), ("val", val_items)):
                for s in range(0, len(todo[split]), batch_size):
                    idx = todo[split][s:s + batch_size]
                    ref_cache[split][0][idx], ref_cache[split][1][idx] = pair_logps(net, items, idx, pad_id, device,
                                                                                    run.autocast)
        cache_seconds = time.time() - t
        raw_model.train()
        del net
        if master:
            checkpoint_io.save(cache_path, {"key": key, "logps": ref_cache})
    if master:
        print(f"reference log-probs: {n_todo:,} pairs computed in {cache_seconds:.1f} s, "
              f"{len(visit) + len(val_items) - n_todo:,} read from {cache_path}")
ref_net = frozen_copy(model_args, start_state, device) if ref_mode == "model" else \
    raw_model if ref_mode == "adapters_off" else None
ref = Reference(ref_mode, ref_net, ref_cache, run.autocast)  # (the global `reference` is the setting)
del start_state

# ---- training loop ----------------------------------------------------------------------------------------
config = {k: globals()[k] for k in config_keys}  # what this run really uses: the checkpoint records it
loss_args = dict(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, sft_weight=sft_weight)
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optim, log, eval_interval,
                               always_save_checkpoint, model_args=model_args, config=config, init_ckpt=init_ckpt,
                               tokenizer=tok.model_path, tokenizer_sha256=tok.sha256(),
                               data={"sampler": "stateless", "seed": seed, "train": train_data})
del resume_ckpt
start_eval = ev = None  # the held-out metrics of the first and of the latest evaluation
timer = runlog.StepTimer()
progress = runlog.Progress("dpo", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x "
                       f"{batch_size * gradient_accumulation_steps} pairs, {loss_type} loss (beta {beta}), held-out "
                       f"evaluation every {eval_interval}", enabled=master)
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_loss = None  # without held-out pairs the checkpoint is still written every eval_interval
        if val_items:
            ev = evaluate_pairs(raw_model, ref, val_items, val_kinds, batch_size, pad_id, device, run.autocast,
                                loss_type, **loss_args)
            start_eval = ev if start_eval is None and iter_num == 0 else start_eval
            val_loss = dist.all_reduce_mean(ev["loss"], run)
            log.write(f"iter {iter_num}: held-out loss {val_loss:.4f}, reward acc {ev['rewards/accuracies']:.3f}, "
                      f"margin {ev['rewards/margins']:.3f}; logp acc {ev['logps/accuracy']:.3f}",
                      iter=iter_num, lr=lr, **{f"val/{k}": v for k, v in ev.items()})
        checkpointer.after_eval(iter_num, val_loss)
        timer.skip()  # evaluation and saving are not training time
    if last:
        break

    # the objective: the pair losses of the whole iteration (every micro-step of every process) summed and divided
    # by its pair count, plus sft_weight x the chosen replies' token NLL over their token count: the same gradient
    # however batch x accumulation x processes is split
    micro_idx = [batches.get(iter_num * gradient_accumulation_steps + run.rank * accum + m) for m in range(accum)]
    n_pairs = dist.all_reduce_sum(sum(len(idx) for idx in micro_idx), run)
    n_chosen = dist.all_reduce_sum(sum(len(train_items[i][1]) for idx in micro_idx for i in idx), run)
    sums, loss_sum, n_tok = {}, 0.0, 0
    for micro, idx in enumerate(micro_idx):
        with dist.gradient_sync(model, micro == accum - 1):  # reduce gradients on the last micro-step only
            loss, m, nt = pair_batch_loss(model, ref, train_items, idx, "train", pad_id, device, run.autocast,
                                          loss_type, n_pairs, n_chosen, **loss_args)
            run.scaler.scale(loss * run.world_size).backward()  # DDP averages the processes' gradients
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        loss_sum += float(loss.detach())
        n_tok += nt
    # pair_metrics' "loss" is a batch mean; the iteration's objective is the normalised sum above
    metrics = {k: dist.all_reduce_sum(v, run) / n_pairs for k, v in sums.items() if k != "loss"}
    metrics["loss"] = dist.all_reduce_sum(loss_sum, run)
    if not run.scaler.is_enabled():
        checkpointer.check_train_loss(iter_num, metrics["loss"])
    optimize.optimizer_step(optim, run.scaler, grad_clip)

    n_tok = int(dist.all_reduce_sum(n_tok, run))
    dt = timer.lap(n_tok)
    progress.step(metrics["loss"], n_tok, dt)
    if iter_num % log_interval == 0:
        log.write(iter=iter_num, lr=lr, dt_ms=dt * 1000, tokens_per_sec=n_tok / dt, **metrics)
    iter_num += 1
progress.close()
checkpointer.at_end(iter_num)  # the final state, so init_from=resume can continue it

# ---- summary, plots, generations before/after --------------------------------------------------------------
final = models.gathered_model(raw_model, run)  # the trained model whole, on the master (FSDP: gathers the shards)
if master:
    # what the reference costs in memory: a frozen copy of the weights, or the cached numbers
    reference_mb = (sum(p.numel() * p.element_size() for p in ref_net.parameters()) if ref_mode == "model" else
                    sum(t.numel() * 4 for c in ref_cache.values() for t in c) if ref_mode == "cached" else 0) / 2 ** 20
    summary = dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1), loss_type=loss_type,
                   beta=beta, reference=ref_mode, lora_rank=lora_rank,
                   trainable_params=n_trainable, reference_cache_seconds=round(cache_seconds, 1),
                   reference_mb=round(reference_mb, 2), **runlog.throughput(timer, device_type))
    if start_eval is not None and ev is not None:
        summary["held_out"] = {
            "pairs": len(val_items),
            "before": {k: start_eval[k] for k in ("logps/accuracy", "logps/margin", "logps/accuracy_by_kind")
                       if k in start_eval},
            "after": {k: ev[k] for k in ("logps/accuracy", "logps/margin", "logps/accuracy_by_kind",
                                         "rewards/accuracies", "rewards/margins") if k in ev}}
        print(f"held-out preference accuracy (logp chosen > logp rejected) over {len(val_items)} pairs: "
              f"before {start_eval['logps/accuracy']:.3f} (mean margin {start_eval['logps/margin']:.2f}) -> "
              f"after {ev['logps/accuracy']:.3f} (mean margin {ev['logps/margin']:.2f}); "
              f"DPO reward accuracy {ev['rewards/accuracies']:.3f}, margin {ev['rewards/margins']:.3f}")
    log.write(summary=summary)
    runlog.plot_log(log.path, os.path.join(out_dir, "loss.png"), (("loss", "train"), ("val/loss", "held-out")),
                title=f"DPO {loss_type} loss")
    runlog.plot_log(log.path, os.path.join(out_dir, "rewards.png"),
                (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin"),
                 ("val/rewards/margins", "held-out margin")), title="DPO implicit rewards (beta x log-ratio)")
    runlog.plot_log(log.path, os.path.join(out_dir, "accuracy.png"),
                (("rewards/accuracies", "reward accuracy"), ("val/rewards/accuracies", "held-out reward acc."),
                 ("val/logps/accuracy", "held-out logp acc.")), title="DPO preference accuracy")
    print(f"summary: {summary}")
    log.close()

    if n_samples and val_pairs:
        # greedy replies to held-out prompts, one per pair kind first, from the starting model and the trained one
        order, seen = [], set()
        for i, p in enumerate(val_pairs):
            if p.get("kind", i) not in seen:
                seen.add(p.get("kind", i))
                order.append(i)
        order = (order + [i for i in range(len(val_pairs)) if i not in order])[:n_samples]
        before_model = models.load_model(init_ckpt, device)[0].eval()
        final.eval()
        n_new = min(96, max_seq_len - 1)
        samples = []
        for i in order:
            ids = torch.tensor([encode_prompt(tok, val_pairs[i]["prompt"], val_pairs[i].get("system"))], device=device)
            ids = ids[:, -(max_seq_len - n_new):]
            # greedy, n_new tokens; the reply is what comes before the first stop token
            reply = lambda m: decode_reply(tok, m.generate(ids, n_new)[0, ids.shape[1]:].tolist())
            samples.append({"prompt": val_pairs[i]["prompt"][-1]["content"], "chosen": val_pairs[i]["chosen"],
                            "before": reply(before_model), "after": reply(final)})
            print(f"--- {samples[-1]['prompt']}\n  before: {samples[-1]['before']!r}\n  after:  {samples[-1]['after']!r}")
        write_json(os.path.join(out_dir, "samples.json"), samples)
    if lora_rank and save_merged:
        models.save_merged(os.path.join(out_dir, "merged.pt"), final, iter_num=iter_num, **checkpointer.fields)
    write_json(os.path.join(out_dir, "summary.json"), summary)  # written last: the run finished
    print(f"done: {iter_num} iterations in {(time.time() - timer.start) / 60:.1f} min; checkpoint {ckpt_path}")
del model, final  # the DDP/FSDP wrapper goes before the process group (see cleanup_ddp)
dist.cleanup_ddp(run)
