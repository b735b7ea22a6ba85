"""
Group Relative Policy Optimization (GRPO, Shao et al. 2024, DeepSeekMath) on verifiable rewards: for each prompt
the policy samples a group of G replies, each reply's advantage is its reward relative to its group, and the
policy maximises the clipped surrogate with a KL penalty to the frozen starting model. Starts from an SFT
checkpoint; the pieces (rollouts, log-probs, advantages, losses) are in babyllama/rl.py.

    python grpo.py --init_ckpt=out/demo/sft/ckpt.pt          # the poetry demo: write the requested form
    torchrun --standalone --nproc_per_node=8 grpo.py ...      # each process samples its own prompts

One iteration: prompts_per_iter prompts (per process) -> G replies each, sampled as one batch with the
KV-cache generator -> rewards (`reward`) -> advantages (group-normalised; normalize_advantages=False is
"Dr. GRPO") -> old log-probs (the policy at sampling time) and reference log-probs -> ppo_epochs passes over
the batch in minibatches of minibatch_size replies, each an optimizer step on
    loss = sum over tokens of [-min(rho A, clip(rho, 1 +- clip_eps) A) + beta * k3(pi, pi_ref)] / count
with count the tokens of the minibatch over all processes (aggregation='token') or its replies with each reply's
token mean ('sequence', the paper's 1/|o|). The sampling RNG is a function of (seed, iteration, process), so a
resumed run samples what an uninterrupted one would. Logged: reward mean/std, the share of replies of the exact
form (poetry), KL, clip fraction, entropy, reply length; held-out greedy replies every eval_interval.

Rewards (`reward`, rl.reward_function): 'poetry' (babyllama/poetry_rewards.py: the requested form, no repeated
clauses, optionally the title and the tones), 'model' (a reward model's scalar, reward_model.py), or 'char:X' (the
share of the reply's characters that are X: a toy objective the tests use to check that the loop optimises).
"""
import os
import statistics
import time

import torch

from babyllama import checkpoint as ck, dist, optimize, runlog
from babyllama.atomic import write_json
from babyllama.configurator import configure
from babyllama.poetry_rewards import exact_form
from babyllama.rl import (Requests, check_reward, evaluate_requests, group_advantages, load_reward_model,
                          policy_and_reference, policy_loss, reply_logps, reward_function, rollout)
from tokenizer.chat_template import decode_reply, stop_ids

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/grpo"
train_prompts = "out/demo/sft_data/train.jsonl"  # where the requests come from (babyllama.poetry_rewards.requests_from)
val_prompts = "out/demo/sft_data/eval_questions.jsonl"  # held-out requests
n_val = 100  # held-out requests scored at every evaluation (greedy)
init_from = "sft"  # 'sft': start from init_ckpt; 'resume': continue out_dir/ckpt.pt
overwrite = False
init_ckpt = "out/demo/sft/ckpt.pt"
eval_interval = 20
log_interval = 1
always_save_checkpoint = True
# GRPO
reward = "poetry"  # 'poetry', 'model' (reward_ckpt's scalar) or 'char:X'
reward_ckpt = "out/demo/reward/best.pt"  # reward_model.py's checkpoint, for reward='model'
w_form, w_repeat, w_title = 1.0, 0.5, 0.0  # the poetry reward's weights
w_tone = 0.0  # > 0: also reward the 平仄 rules, with tone_table (python -m babyllama.poetry_rewards builds it)
tone_table = "out/demo/tones.json"
group_size = 8  # G replies per prompt
prompts_per_iter = 4  # per process
max_new_tokens = 64
temperature = 1.0
top_p = 1.0
beta = 0.04  # the KL penalty's weight
clip_eps = 0.2
ppo_epochs = 1  # passes over each batch of samples
minibatch_size = 32  # replies per optimizer step (at most prompts_per_iter * group_size)
normalize_advantages = True  # False: Dr. GRPO (the group mean only)
aggregation = "token"  # 'token' or 'sequence'
# training
max_iters = 100
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 5
lr_decay_iters = 0  # 0 = max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
seed = 1337
# system
device = "auto"
dtype = "auto"
compile = False  # rollouts vary in length: no fixed shapes
num_threads = 0
max_minutes = 0.0
bench_rollout = True  # measure a batched group against one-at-a-time generation at the start
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())
if aggregation not in ("token", "sequence"):
    raise SystemExit(f"aggregation must be 'token' or 'sequence', not {aggregation!r}")
check_reward(reward)

# ---- set-up -----------------------------------------------------------------------------------------------
run = dist.setup_run(device, dtype, num_threads, 1, out_dir, compile, False)
device, device_type, master = run.device, run.device_type, run.master
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume_ckpt = ck.resume(init_from, "sft", ckpt_path, device, globals(), config_keys, changed, ck.FINETUNE_KEYS,
                        overwrite)
iter_num = resume_ckpt["iter_num"] if resume_ckpt else 0
lr_decay_iters = lr_decay_iters or max_iters
# the policy, its optimizer, and pi_ref: the starting weights, frozen
model, model_args, optimizer, module, ref, tok = policy_and_reference(init_ckpt, resume_ckpt, run, seed, weight_decay,
                                                                      learning_rate, (beta1, beta2))
raw_model = model
stops = stop_ids(tok)
pad_id = max(tok.pad_id, 0)


def checksum(net):
    return float(sum(p.double().sum() for p in net.parameters()))


ref_checksum = checksum(ref)

# ---- prompts and rewards --------------------------------------------------------------------------------------
train = Requests(tok, train_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank)
val = Requests(tok, val_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank, n_val) if val_prompts \
    else None
rm = load_reward_model(reward_ckpt, device)[0] if reward == "model" else None
rewards_of = reward_function(reward, (w_form, w_repeat, w_title, w_tone), tone_table, rm, tok, device)


def bench_group(repeats=3):
    """Tokens/s of one prompt's G replies generated as one batch against G one-at-a-time generations (same
    prompt, same sampling, same run; after a warm-up, the median of `repeats` timings of each)."""
    p = train.ids(train.items[0])
    raw_model.eval()
    timings = {"one at a time": [], "one batch": []}
    with run.autocast:
        rollout(raw_model, [p], group_size, max_new_tokens, [], device, temperature, top_p,
                train.sampler(9_999, device))
        for r in range(repeats):
            for name, groups in (("one at a time", [1] * group_size), ("one batch", [group_size])):
                t0, n = time.perf_counter(), 0
                for k, g in enumerate(groups):
                    n += sum(len(x) for x in rollout(raw_model, [p], g, max_new_tokens, [], device, temperature,
                                                     top_p, train.sampler(10_000 + 100 * r + k, device)))
                timings[name].append(n / (time.perf_counter() - t0))
    raw_model.train()
    return {name: statistics.median(v) for name, v in timings.items()}


# ---- training loop ----------------------------------------------------------------------------------------
config = {k: globals()[k] for k in config_keys}
log = runlog.JsonlLog(os.path.join(out_dir, "log.jsonl"), iter_num if resume_ckpt else None, enabled=master)
checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optimizer, log, eval_interval,
                               always_save_checkpoint, model_args=model_args, config=config, init_ckpt=init_ckpt,
                               tokenizer=tok.model_path, tokenizer_sha256=tok.sha256(),
                               data={"sampler": "stateless", "seed": seed, "train": train_prompts})
del resume_ckpt
rollout_bench = bench_group() if bench_rollout and master and iter_num == 0 else None
if rollout_bench:
    print(f"rollout: a group of {group_size} as one batch {rollout_bench['one batch']:.0f} tokens/s, one at a time "
          f"{rollout_bench['one at a time']:.0f} tokens/s ({rollout_bench['one batch'] / rollout_bench['one at a time']:.1f}x)")
first_eval = last_eval = None
timer = runlog.StepTimer()
rollout_seconds = train_seconds = rollout_tokens = train_tokens = 0.0
progress = runlog.Progress("grpo", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x {prompts_per_iter} prompts "
                       f"x {group_size} replies, {ppo_epochs} pass(es); held-out evaluation every {eval_interval}",
                       enabled=master)
while True:
    lr = optimize.set_lr(optimizer, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        val_metric = None
        if val is not None:
            with run.autocast:
                ev, replies = evaluate_requests(raw_model, tok, val, val.items, rewards_of, max_new_tokens, stops,
                                                device)
            first_eval = ev if first_eval is None and iter_num == 0 else first_eval
            last_eval = ev
            val_metric = -dist.all_reduce_mean(ev["reward"], run)  # the Checkpointer keeps the lowest: -reward
            log.write(f"iter {iter_num}: held-out reward {ev['reward']:.3f}, exact form {ev['exact_form']:.3f}, "
                      f"length {ev['length']:.1f}; e.g. {val.items[0]} -> {replies[0][:40]!r}",
                      iter=iter_num, **{f"val/{k}": v for k, v in ev.items()})
        checkpointer.after_eval(iter_num, val_metric)
        timer.skip()
    if last:
        break

    # ---- rollout: G replies per prompt, one batch, sampled with this iteration's RNG ----
    t0 = time.time()
    requests = train.of_iteration(iter_num, prompts_per_iter)
    prompts = [train.ids(r) for r in requests]
    raw_model.eval()
    with run.autocast:
        replies = rollout(raw_model, prompts, group_size, max_new_tokens, stops, device, temperature, top_p,
                          train.sampler(iter_num, device))
    replies = [r if r else [tok.end_id] for r in replies]  # an empty reply still scores its stop
    texts = [decode_reply(tok, r) for r in replies]
    rows = [p for p in prompts for _ in range(group_size)]
    rewards = torch.tensor(rewards_of([requests[i // group_size] for i in range(len(texts))], texts))
    advantages = group_advantages(rewards, group_size, normalize_advantages).to(device)
    with torch.no_grad(), run.autocast:
        old_logp, mask, _ = reply_logps(raw_model, rows, replies, pad_id, device)
        ref_logp, _, _ = reply_logps(ref, rows, replies, pad_id, device)
    raw_model.train()
    rollout_seconds += time.time() - t0
    rollout_tokens += float(mask.sum())

    # ---- optimisation: ppo_epochs passes in minibatches; each loss is a sum over this minibatch's tokens (or
    # replies) divided by their count over all processes, so the step does not depend on how replies are split
    t0 = time.time()
    stats = {"kl": 0.0, "clipped": 0.0, "tokens": 0.0, "entropy": 0.0, "loss": 0.0}
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + iter_num))
    for epoch in range(ppo_epochs):
        for s in range(0, len(rows), minibatch_size):
            idx = order[s:s + minibatch_size].tolist()
            n = dist.all_reduce_sum(float(mask[idx].sum()) if aggregation == "token" else float(len(idx)), run)
            with run.autocast:
                logp, m, ent = reply_logps(module, [rows[i] for i in idx], [replies[i] for i in idx], pad_id, device,
                                           with_entropy=True)
                T = logp.shape[1]
                loss, st = policy_loss(logp, old_logp[idx, :T], advantages[idx], m, clip_eps, beta,
                                       ref_logp[idx, :T], aggregation)
                loss = loss / n
            run.scaler.scale(loss * run.world_size).backward()  # DDP averages the processes' gradients
            optimize.optimizer_step(optimizer, run.scaler, grad_clip)
            for k in ("kl", "clipped", "tokens"):
                stats[k] += st[k]
            stats["entropy"] += float((ent * m).sum().detach())
            stats["loss"] += float(loss.detach())
    train_seconds += time.time() - t0
    train_tokens += stats["tokens"]
    tok_total = dist.all_reduce_sum(stats["tokens"], run)
    metrics = {"reward": dist.all_reduce_mean(float(rewards.mean()), run), "reward_std": float(rewards.std()),
               "kl": dist.all_reduce_sum(stats["kl"], run) / tok_total,
               "clip_frac": dist.all_reduce_sum(stats["clipped"], run) / tok_total,
               "entropy": dist.all_reduce_sum(stats["entropy"], run) / tok_total,
               "length": float(mask.sum(1).mean()), "loss": stats["loss"]}
    if reward == "poetry":
        metrics["exact_form"] = sum(exact_form(requests[i // group_size], texts[i])
                                    for i in range(len(texts))) / len(texts)
    if not run.scaler.is_enabled():  # a diverged run stops and keeps its last good checkpoint
        checkpointer.check_train_loss(iter_num, metrics["loss"])
    dt = timer.lap(int(tok_total))
    progress.step(-metrics["reward"], int(tok_total), dt)
    if iter_num % log_interval == 0:
        log.write(iter=iter_num, lr=lr, dt_ms=dt * 1000, **metrics)
    iter_num += 1
progress.close()
checkpointer.at_end(iter_num)

# ---- summary ----------------------------------------------------------------------------------------------------
if master:
    summary = dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1), group_size=group_size,
                   beta=beta, reward=reward, ref_unchanged=checksum(ref) == ref_checksum,
                   rollout_tokens_per_sec=round(rollout_tokens / max(rollout_seconds, 1e-9), 1),
                   train_tokens_per_sec=round(train_tokens / max(train_seconds, 1e-9), 1))
    if rollout_bench:
        summary["rollout_bench"] = {k: round(v, 1) for k, v in rollout_bench.items()}
    if first_eval and last_eval:
        summary["held_out"] = {"requests": len(val.items), "before": first_eval, "after": last_eval}
        print(f"held-out requests ({len(val.items)}): exact form {first_eval['exact_form']:.3f} -> "
              f"{last_eval['exact_form']:.3f}, reward {first_eval['reward']:.3f} -> {last_eval['reward']:.3f}")
    log.write(summary=summary)
    runlog.plot_log(log.path, os.path.join(out_dir, "reward.png"), (("reward", "train (sampled)"),
                ("val/reward", "held-out (greedy)")), title=f"GRPO reward ({reward})")
    runlog.plot_log(log.path, os.path.join(out_dir, "kl.png"), (("kl", "KL (k3) to the reference"),),
                title="GRPO KL")
    print(f"summary: {summary}")
    log.close()
    write_json(os.path.join(out_dir, "summary.json"), summary)
del module
dist.cleanup_ddp(run)
