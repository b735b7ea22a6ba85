"""
RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), as MedicalGPT describes it: a
policy (the SFT model, trained), its frozen copy as the reference, a reward (a trained reward model, or the
poetry rules), and a value model initialised from the reward model (trained beside the policy).

    python ppo.py --init_ckpt=out/demo/sft/ckpt.pt --reward_ckpt=out/demo/reward/best.pt
    python ppo.py --init_ckpt=out/demo/sft/ckpt.pt --reward=poetry --value_ckpt=out/demo/reward/best.pt

One iteration: prompts_per_iter prompts (per process), one sampled reply each (the KV-cache generator, one
batch) -> per-token rewards: -kl_coef * (log pi - log pi_ref) on every reply token, plus the sequence reward
(the reward model's scalar, or the rule score) on the last -> values -> GAE advantages (whitened over the batch)
and returns -> ppo_epochs passes in minibatches, each step minimising
    policy: sum over tokens of -min(rho A, clip(rho, 1 +- clip_eps) A)  / the minibatch's tokens (all processes)
    value:  vf_coef * 0.5 max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2) summed / the same count
with the policy and the value model on one AdamW each. The sampling RNG is a function of (seed, iteration,
process). Logged: reward, KL, clip fraction, entropy, value loss, reply length; held-out greedy replies.
The pieces (rollouts, log-probs, GAE, losses, the reward model) are in babyllama/rl.py.
"""
import os
import time

import torch

from babyllama import checkpoint as ck, dist, optimize, runlog
from babyllama.atomic import write_json
from babyllama.configurator import configure
from babyllama.poetry_rewards import exact_form
from babyllama.rl import (Requests, check_reward, evaluate_requests, gae, load_reward_model, policy_and_reference,
                          policy_loss, reply_logps, reward_function, rollout, value_loss)
from tokenizer.chat_template import decode_reply, stop_ids

# -----------------------------------------------------------------------------------------------------------
out_dir = "out/ppo"
train_prompts = "out/demo/sft_data/train.jsonl"
val_prompts = "out/demo/sft_data/eval_questions.jsonl"
n_val = 100
init_from = "sft"  # 'sft' or 'resume'
overwrite = False
init_ckpt = "out/demo/sft/ckpt.pt"  # the policy's start and the reference
reward = "model"  # 'model' (reward_ckpt's scalar) or 'poetry' (the form rules) or 'char:X'
reward_ckpt = "out/demo/reward/best.pt"  # the reward model (reward_model.py)
value_ckpt = ""  # the value model's start: a reward model checkpoint; "" = reward_ckpt
w_form, w_repeat, w_title = 1.0, 0.5, 0.0
w_tone = 0.0  # > 0: also reward the 平仄 rules, with tone_table (python -m babyllama.poetry_rewards builds it)
tone_table = "out/demo/tones.json"
eval_interval = 20
log_interval = 1
always_save_checkpoint = True
prompts_per_iter = 16  # per process: one reply each
max_new_tokens = 64
temperature = 1.0
top_p = 1.0
kl_coef = 0.05  # the per-token KL penalty in the reward
gamma = 1.0
lam = 0.95
clip_eps = 0.2
cliprange_value = 0.2
vf_coef = 0.5
ppo_epochs = 2
minibatch_size = 8
max_iters = 100
learning_rate = 1e-5
value_learning_rate = 1e-4
min_lr = 1e-6
warmup_iters = 5
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
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())
check_reward(reward)

run = dist.setup_run(device, dtype, num_threads, 1, out_dir, compile, False)
device, device_type, master = run.device, run.device_type, run.master
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume_ckpt = ck.resume(init_from, "sft", ckpt_path, device, globals(), config_keys, changed, ck.FINETUNE_KEYS,
                        overwrite)
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
lr_decay_iters = lr_decay_iters or max_iters

# ---- the four models ----------------------------------------------------------------------------------------
# the policy, its optimizer, and pi_ref: the starting weights, frozen
model, model_args, optimizer, module, ref, tok = policy_and_reference(init_ckpt, resume_ckpt, run, seed, weight_decay,
                                                                      learning_rate, (beta1, beta2))
raw_model = model
rm = load_reward_model(reward_ckpt, device)[0] if reward == "model" else None
if rm is not None:
    rm.requires_grad_(False)
value_model, _ = load_reward_model(value_ckpt or reward_ckpt, device)
value_model.train()
if resume_ckpt is not None:
    value_model.load_state_dict(resume_ckpt["value_model"])
value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=value_learning_rate, betas=(beta1, beta2))
if resume_ckpt is not None:
    value_optimizer.load_state_dict(resume_ckpt["value_optimizer"])


def average_value_grads():
    """The value model is called through .values (not a DDP forward): average its gradients over processes here."""
    if run.ddp:
        for p in value_model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= run.world_size


stops = stop_ids(tok)
pad_id = max(tok.pad_id, 0)

train = Requests(tok, train_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank)
val = Requests(tok, val_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank, n_val) if val_prompts \
    else None
rewards_of = reward_function(reward, (w_form, w_repeat, w_title, w_tone), tone_table, rm, tok, device)


config = {k: globals()[k] for k in config_keys}
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optimizer, log, eval_interval,
                               always_save_checkpoint, model_args=model_args, config=config, init_ckpt=init_ckpt,
                               tokenizer=tok.model_path, tokenizer_sha256=tok.sha256(),
                               data={"sampler": "stateless", "seed": seed, "train": train_prompts})


def keep_value_model():
    """Put the value model and its optimizer, as they are now, into what the next checkpoint saves."""
    checkpointer.fields.update(value_model=value_model.state_dict(), value_optimizer=value_optimizer.state_dict())


del resume_ckpt
first_eval = last_eval = None
timer = runlog.StepTimer()
rollout_seconds = train_seconds = rollout_tokens = train_tokens = 0.0
progress = runlog.Progress("ppo", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x {prompts_per_iter} "
                       f"replies, {ppo_epochs} passes; held-out evaluation every {eval_interval}", enabled=master)
while True:
    lr = optimize.set_lr(optimizer, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    optimize.set_lr(value_optimizer, iter_num, value_learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_metric = None
        if val is not None:
            with run.autocast:
                ev, texts = evaluate_requests(raw_model, tok, val, val.items, rewards_of, max_new_tokens, stops,
                                              device)
            first_eval = ev if first_eval is None and iter_num == 0 else first_eval
            last_eval = ev
            val_metric = -dist.all_reduce_mean(ev["reward"], run)
            log.write(f"iter {iter_num}: held-out reward {ev['reward']:.3f}, exact form {ev['exact_form']:.3f}, "
                      f"length {ev['length']:.1f}; e.g. {val.items[0]} -> {texts[0][:40]!r}",
                      iter=iter_num, **{f"val/{k}": v for k, v in ev.items()})
        keep_value_model()
        checkpointer.after_eval(iter_num, val_metric)
        timer.skip()
    if last:
        break

    # ---- rollout, rewards, values, advantages ----
    t0 = time.time()
    requests = train.of_iteration(iter_num, prompts_per_iter)
    prompts = [train.ids(r) for r in requests]
    raw_model.eval()
    with run.autocast:
        replies = rollout(raw_model, prompts, 1, max_new_tokens, stops, device, temperature, top_p,
                          train.sampler(iter_num, device))
    replies = [r if r else [tok.end_id] for r in replies]
    texts = [decode_reply(tok, r) for r in replies]
    with torch.no_grad(), run.autocast:
        old_logp, mask, _ = reply_logps(raw_model, prompts, replies, pad_id, device)
        ref_logp, _, _ = reply_logps(ref, prompts, replies, pad_id, device)
        old_values = value_model.values(prompts, replies, device) * mask
        seq_r = torch.tensor(rewards_of(requests, texts), device=old_logp.device)
    raw_model.train()
    kl = (old_logp - ref_logp) * mask  # per-token log-ratio: the KL penalty's estimate
    token_rewards = -kl_coef * kl
    ends = mask.sum(1).long() - 1
    token_rewards[torch.arange(len(replies)), ends] += seq_r
    advantages, returns = gae(token_rewards, old_values, mask, gamma, lam)
    n_adv = dist.all_reduce_sum(float(mask.sum()), run)
    mean = dist.all_reduce_sum(float((advantages * mask).sum()), run) / n_adv
    var = dist.all_reduce_sum(float((((advantages - mean) * mask) ** 2).sum()), run) / n_adv
    advantages = (advantages - mean) / (var ** 0.5 + 1e-8) * mask  # whitened over the batch (all processes)
    rollout_seconds += time.time() - t0
    rollout_tokens += float(mask.sum())

    # ---- optimisation ----
    t0 = time.time()
    stats = {"kl": 0.0, "clipped": 0.0, "tokens": 0.0, "entropy": 0.0, "vf": 0.0, "loss": 0.0}
    g = torch.Generator().manual_seed(seed + iter_num)
    for epoch in range(ppo_epochs):
        order = torch.randperm(len(replies), generator=g).tolist()
        for s in range(0, len(replies), minibatch_size):
            idx = order[s:s + minibatch_size]
            n = dist.all_reduce_sum(float(mask[idx].sum()), run)
            with run.autocast:
                logp, m, ent = reply_logps(module, [prompts[i] for i in idx], [replies[i] for i in idx], pad_id,
                                           device, with_entropy=True)
                T = logp.shape[1]
                pl, st = policy_loss(logp, old_logp[idx, :T], advantages[idx, :T], m, clip_eps, 0.0,
                                     ref_logp[idx, :T])
                v = value_model.values([prompts[i] for i in idx], [replies[i] for i in idx], device)
                vl = vf_coef * value_loss(v, old_values[idx, :T], returns[idx, :T], m, cliprange_value)
            run.scaler.scale((pl / n) * run.world_size).backward()
            optimize.optimizer_step(optimizer, run.scaler, grad_clip)
            ((vl / n) * run.world_size).backward()
            average_value_grads()
            torch.nn.utils.clip_grad_norm_(value_model.parameters(), grad_clip)
            value_optimizer.step()
            value_optimizer.zero_grad(set_to_none=True)
            for k in ("kl", "clipped", "tokens"):
                stats[k] += st[k]
            stats["entropy"] += float((ent * m).sum().detach())
            stats["vf"] += float(vl.detach())
            stats["loss"] += float((pl / n + vl / n).detach())
    train_seconds += time.time() - t0
    train_tokens += stats["tokens"]
    tok_total = dist.all_reduce_sum(stats["tokens"], run)
    metrics = {"reward": dist.all_reduce_mean(float(seq_r.mean()), run),
               "kl": dist.all_reduce_sum(float(kl.sum()), run) / n_adv,
               "clip_frac": dist.all_reduce_sum(stats["clipped"], run) / tok_total,
               "entropy": dist.all_reduce_sum(stats["entropy"], run) / tok_total,
               "value_loss": dist.all_reduce_sum(stats["vf"], run) / tok_total,
               "length": float(mask.sum(1).mean())}
    metrics["exact_form"] = sum(exact_form(q, a) for q, a in zip(requests, texts)) / len(texts)
    if not run.scaler.is_enabled():  # a diverged run stops and keeps its last good checkpoint
        checkpointer.check_train_loss(iter_num, stats["loss"])
    dt = timer.lap(int(tok_total))
    progress.step(-metrics["reward"], int(tok_total), dt)
    if iter_num % log_interval == 0:
        log.write(iter=iter_num, lr=lr, dt_ms=dt * 1000, **metrics)
    iter_num += 1
progress.close()
keep_value_model()
checkpointer.at_end(iter_num)

if master:
    summary = dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1), reward=reward, kl_coef=kl_coef,
                   rollout_tokens_per_sec=round(rollout_tokens / max(rollout_seconds, 1e-9), 1),
                   train_tokens_per_sec=round(train_tokens / max(train_seconds, 1e-9), 1))
    if first_eval and last_eval:
        summary["held_out"] = {"requests": len(val.items), "before": first_eval, "after": last_eval}
        print(f"held-out requests ({len(val.items)}): exact form {first_eval['exact_form']:.3f} -> "
              f"{last_eval['exact_form']:.3f}, reward {first_eval['reward']:.3f} -> {last_eval['reward']:.3f}")
    log.write(summary=summary)
    runlog.plot_log(log.path, os.path.join(out_dir, "reward.png"), (("reward", "train (sampled)"),
                ("val/reward", "held-out (greedy)")), title=f"PPO reward ({reward})")
    runlog.plot_log(log.path, os.path.join(out_dir, "kl.png"), (("kl", "KL to the reference"),), title="PPO KL")
    log.close()
    write_json(os.path.join(out_dir, "summary.json"), summary)
del module
dist.cleanup_ddp(run)
