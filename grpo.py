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

The reward (`reward`) is one of REWARDS in babyllama/rewards.py: the poetry form rules, a reward model's scalar, or
a toy; `--reward=?` lists them. What the run does around the loop is in babyllama/rl_run.py.
"""
import time

import torch

from babyllama import dist, optimize, rl, rl_run, runlog
from babyllama.configurator import configure
from babyllama.poetry_rewards import exact_form_share
from babyllama.rewards import check_reward, reward_function

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/grpo"
train_prompts = "out/demo/sft_data/train.jsonl"  # where the requests come from (babyllama.poetry_rewards.requests_from)
val_prompts = "out/demo/sft_data/eval_questions.jsonl"  # held-out requests
n_val = 100  # held-out requests scored at every evaluation (greedy)
init_from = "sft"  # 'sft': start from init_ckpt; 'resume': continue out_dir/ckpt.pt
overwrite = False
init_ckpt = "out/demo/sft/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt, or its copy beside init_ckpt
eval_interval = 20
log_interval = 1
always_save_checkpoint = True
# GRPO
reward = "poetry"  # a name in REWARDS (babyllama/rewards.py; --reward=? lists them)
reward_ckpt = "out/demo/reward/best.pt"  # reward_model.py's checkpoint, for reward='model'
w_form, w_repeat, w_title = 1.0, 0.5, 0.0  # the poetry reward's weights
w_tone = 0.0  # > 0: also reward the 平仄 rules, with tone_table
tone_table = "out/demo/tones.json"  # char -> 平/仄; built from the poetry corpus when the file does not exist yet
poetry = "data/chinese-poetry"  # the chinese-poetry package a missing tone_table is built from
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
# -----------------------------------------------------------------------------------------------------------
config_keys, changed = configure(globals())
if aggregation not in ("token", "sequence"):
    raise SystemExit(f"aggregation must be 'token' or 'sequence', not {aggregation!r}")
check_reward(reward)
lr_decay_iters = lr_decay_iters or max_iters

# ---- set-up: the policy, its optimizer and pi_ref (the starting weights, frozen); the requests; the reward ------
run, ckpt_path, resume_ckpt, iter_num, fixed = rl_run.setup(out_dir, init_from, overwrite,
                                                           {k: globals()[k] for k in config_keys}, changed,
                                                           device, dtype, num_threads, compile)
globals().update(fixed)  # resuming: the run's starting checkpoint (init_ckpt) is the checkpoint's
device, master = run.device, run.master
raw_model, model_args, optim, model, ref, tok = rl_run.policy_and_reference(init_ckpt, resume_ckpt, run, seed,
                                                                            weight_decay, learning_rate, (beta1, beta2),
                                                                            tokenizer_model)
pad_id = max(tok.pad_id, 0)
train = rl_run.Requests(tok, train_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank)
val = rl_run.Requests(tok, val_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank, n_val) \
    if val_prompts else None
rewards_of = reward_function(reward, weights=(w_form, w_repeat, w_title, w_tone), tone_table=tone_table,
                             poetry=poetry, reward_ckpt=reward_ckpt, tok=tok, device=device)

# ---- training loop ----------------------------------------------------------------------------------------
log, checkpointer = rl_run.log_and_checkpointer({k: globals()[k] for k in config_keys}, ckpt_path, resume_ckpt, run,
                                                raw_model, optim, model_args, tok)
del resume_ckpt
evals = {}  # iteration -> held-out scores (None without val_prompts)
timer = runlog.StepTimer()
seconds, tokens = {"rollout": 0.0, "train": 0.0}, {"rollout": 0.0, "train": 0.0}
progress = runlog.Progress("grpo", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x {prompts_per_iter} "
                           f"prompts x {group_size} replies, {ppo_epochs} pass(es); held-out evaluation every "
                           f"{eval_interval}", enabled=master)
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        evals[iter_num] = rl_run.evaluate(checkpointer, raw_model, tok, val, rewards_of, max_new_tokens, run, log,
                                          iter_num)
        timer.skip()
    if last:
        break

    # ---- rollout: G replies per prompt, one batch, sampled with this iteration's RNG; rewards; advantages ----
    t0 = time.time()
    raw_model.eval()
    asked, rows, replies, texts = rl_run.sample(raw_model, tok, train, iter_num, prompts_per_iter, group_size,
                                                max_new_tokens, temperature, top_p, run)
    rewards = torch.tensor(rewards_of(asked, texts))
    advantages = rl.group_advantages(rewards, group_size, normalize_advantages).to(device)
    with torch.no_grad(), run.autocast:
        old_logp, mask, _ = rl.reply_logps(raw_model, rows, replies, pad_id, device)
        ref_logp, _, _ = rl.reply_logps(ref, rows, replies, pad_id, device)
    raw_model.train()
    seconds["rollout"] += time.time() - t0
    tokens["rollout"] += float(mask.sum())

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
                loss, st = rl.minibatch_policy_loss(model, rows, replies, idx, old_logp, ref_logp, advantages, pad_id,
                                                    device, clip_eps, beta, aggregation)
                loss = loss / n
            run.scaler.scale(loss * run.world_size).backward()  # DDP averages the processes' gradients
            optimize.optimizer_step(optim, run.scaler, grad_clip)
            for k, v in st.items():
                stats[k] += v
            stats["loss"] += float(loss.detach())
    seconds["train"] += time.time() - t0
    tokens["train"] += stats["tokens"]
    tok_total = dist.all_reduce_sum(stats["tokens"], run)
    metrics = {"reward": dist.all_reduce_mean(float(rewards.mean()), run), "reward_std": float(rewards.std()),
               "kl": dist.all_reduce_sum(stats["kl"], run) / tok_total,
               "clip_frac": dist.all_reduce_sum(stats["clipped"], run) / tok_total,
               "entropy": dist.all_reduce_sum(stats["entropy"], run) / tok_total,
               "length": float(mask.sum(1).mean()), "loss": stats["loss"]}
    if reward == "poetry":
        metrics["exact_form"] = exact_form_share(asked, texts)
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
    rl_run.write_summary(out_dir, log, dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1),
                                            group_size=group_size, beta=beta, reward=reward,
                                            **rl_run.tokens_per_sec(tokens, seconds)),
                         evals, val, "GRPO", "KL (k3) to the reference")
del model
dist.cleanup_ddp(run)
