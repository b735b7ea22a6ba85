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
The pieces (rollouts, log-probs, GAE, losses) are in babyllama/rl.py, the reward model in babyllama/reward_model.py,
the rewards by name (`reward`: REWARDS) in babyllama/rewards.py, what the run does around its loop in
babyllama/rl_run.py.
"""
import time

import torch

from babyllama import dist, optimize, rl, rl_run, runlog
from babyllama.configurator import configure
from babyllama.poetry_rewards import exact_form_share
from babyllama.reward_model import load_reward_model
from babyllama.rewards import check_reward, reward_function

# -----------------------------------------------------------------------------------------------------------
out_dir = "out/ppo"
train_prompts = "out/demo/sft_data/train.jsonl"
val_prompts = "out/demo/sft_data/eval_questions.jsonl"
n_val = 100
init_from = "sft"  # 'sft' or 'resume'
overwrite = False
init_ckpt = "out/demo/sft/ckpt.pt"  # the policy's start and the reference
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt, or its copy beside init_ckpt
reward = "model"  # a name in REWARDS (babyllama/rewards.py; --reward=? lists them)
reward_ckpt = "out/demo/reward/best.pt"  # the reward model (reward_model.py)
value_ckpt = ""  # the value model's start: a reward model checkpoint; "" = reward_ckpt
w_form, w_repeat, w_title = 1.0, 0.5, 0.0
w_tone = 0.0  # > 0: also reward the 平仄 rules, with tone_table
tone_table = "out/demo/tones.json"  # char -> 平/仄; built from the poetry corpus when the file does not exist yet
poetry = "data/chinese-poetry"  # the chinese-poetry package a missing tone_table is built from
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
lr_decay_iters = lr_decay_iters or max_iters

# ---- set-up -----------------------------------------------------------------------------------------------
run, ckpt_path, resume_ckpt, iter_num, fixed = rl_run.setup(out_dir, init_from, overwrite,
                                                           {k: globals()[k] for k in config_keys}, changed,
                                                           device, dtype, num_threads, compile)
globals().update(fixed)  # resuming: the run's starting checkpoint (init_ckpt) is the checkpoint's
device, master = run.device, run.master

# ---- the four models: the policy (and its optimizer), pi_ref (the starting weights, frozen), the reward (a model
# or rules) and the value model (a reward model, trained here with its own AdamW) ----------------------------------
raw_model, model_args, optim, model, ref, tok = rl_run.policy_and_reference(init_ckpt, resume_ckpt, run, seed,
                                                                            weight_decay, learning_rate, (beta1, beta2),
                                                                            tokenizer_model)
rewards_of = reward_function(reward, weights=(w_form, w_repeat, w_title, w_tone), tone_table=tone_table,
                             poetry=poetry, reward_ckpt=reward_ckpt, tok=tok, device=device)
value_model, _ = load_reward_model(value_ckpt or reward_ckpt, device)
value_model.train()
if resume_ckpt is not None:
    value_model.load_state_dict(resume_ckpt["value_model"])
value_optim = torch.optim.AdamW(value_model.parameters(), lr=value_learning_rate, betas=(beta1, beta2))
if resume_ckpt is not None:
    value_optim.load_state_dict(resume_ckpt["value_optimizer"])


def average_value_grads():
    """The value model is called through .values (not a DDP forward): average its gradients over processes here."""
    if run.ddp:
        for p in value_model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= run.world_size


pad_id = max(tok.pad_id, 0)
train = rl_run.Requests(tok, train_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank)
val = rl_run.Requests(tok, val_prompts, model_args["max_seq_len"], max_new_tokens, seed, run.rank, n_val) \
    if val_prompts else None
log, checkpointer = rl_run.log_and_checkpointer({k: globals()[k] for k in config_keys}, ckpt_path, resume_ckpt, run,
                                                raw_model, optim, model_args, tok)


def keep_value_model():
    """Put the value model and its optimizer, as they are now, into what the next checkpoint saves."""
    checkpointer.fields.update(value_model=value_model.state_dict(), value_optimizer=value_optim.state_dict())


# ---- training loop ----------------------------------------------------------------------------------------
del resume_ckpt
evals = {}  # iteration -> held-out scores (None without val_prompts)
timer = runlog.StepTimer()
seconds, tokens = {"rollout": 0.0, "train": 0.0}, {"rollout": 0.0, "train": 0.0}
progress = runlog.Progress("ppo", iter_num, max_iters, f"{max_iters - iter_num:,} iterations x {prompts_per_iter} "
                           f"replies, {ppo_epochs} passes; held-out evaluation every {eval_interval}", enabled=master)
while True:
    lr = optimize.set_lr(optim, iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    optimize.set_lr(value_optim, iter_num, value_learning_rate, warmup_iters, lr_decay_iters, min_lr)
    last = iter_num >= max_iters or timer.out_of_time(max_minutes, run)
    if checkpointer.eval_due(iter_num, last):
        keep_value_model()
        evals[iter_num] = rl_run.evaluate(checkpointer, raw_model, tok, val, rewards_of, max_new_tokens, run, log,
                                          iter_num)
        timer.skip()
    if last:
        break

    # ---- rollout (one reply per prompt), rewards, values, advantages ----
    t0 = time.time()
    raw_model.eval()
    asked, prompts, replies, texts = rl_run.sample(raw_model, tok, train, iter_num, prompts_per_iter, 1,
                                                   max_new_tokens, temperature, top_p, run)
    with torch.no_grad(), run.autocast:
        old_logp, mask, _ = rl.reply_logps(raw_model, prompts, replies, pad_id, device)
        ref_logp, _, _ = rl.reply_logps(ref, prompts, replies, pad_id, device)
        old_values = value_model.values(prompts, replies, device) * mask
        seq_r = torch.tensor(rewards_of(asked, texts), device=old_logp.device)
    raw_model.train()
    kl = (old_logp - ref_logp) * mask  # per-token log-ratio: the KL penalty's estimate
    token_rewards = -kl_coef * kl
    ends = mask.sum(1).long() - 1
    token_rewards[torch.arange(len(replies)), ends] += seq_r
    advantages, returns = rl.gae(token_rewards, old_values, mask, gamma, lam)
    n_adv = dist.all_reduce_sum(float(mask.sum()), run)
    mean = dist.all_reduce_sum(float((advantages * mask).sum()), run) / n_adv
    var = dist.all_reduce_sum(float((((advantages - mean) * mask) ** 2).sum()), run) / n_adv
    advantages = (advantages - mean) / (var ** 0.5 + 1e-8) * mask  # whitened over the batch (all processes)
    seconds["rollout"] += time.time() - t0
    tokens["rollout"] += float(mask.sum())

    # ---- optimisation: the policy and the value model, each a step per minibatch ----
    t0 = time.time()
    stats = {"kl": 0.0, "clipped": 0.0, "tokens": 0.0, "entropy": 0.0, "vf": 0.0, "loss": 0.0}
    g = torch.Generator().manual_seed(seed + iter_num)
    for epoch in range(ppo_epochs):
        order = torch.randperm(len(replies), generator=g).tolist()
        for s in range(0, len(replies), minibatch_size):
            idx = order[s:s + minibatch_size]
            n = dist.all_reduce_sum(float(mask[idx].sum()), run)
            with run.autocast:
                pl, st = rl.minibatch_policy_loss(model, prompts, replies, idx, old_logp, ref_logp, advantages,
                                                  pad_id, device, clip_eps)
                values = value_model.values([prompts[i] for i in idx], [replies[i] for i in idx], device)
                T = values.shape[1]
                vl = vf_coef * rl.value_loss(values, old_values[idx, :T], returns[idx, :T], mask[idx, :T],
                                             cliprange_value)
            run.scaler.scale((pl / n) * run.world_size).backward()
            optimize.optimizer_step(optim, run.scaler, grad_clip)
            ((vl / n) * run.world_size).backward()
            average_value_grads()
            torch.nn.utils.clip_grad_norm_(value_model.parameters(), grad_clip)
            value_optim.step()
            value_optim.zero_grad(set_to_none=True)
            for k, v in st.items():
                stats[k] += v
            stats["vf"] += float(vl.detach())
            stats["loss"] += float((pl / n + vl / n).detach())
    seconds["train"] += time.time() - t0
    tokens["train"] += stats["tokens"]
    tok_total = dist.all_reduce_sum(stats["tokens"], run)
    metrics = {"reward": dist.all_reduce_mean(float(seq_r.mean()), run),
               "kl": dist.all_reduce_sum(float(kl.sum()), run) / n_adv,
               "clip_frac": dist.all_reduce_sum(stats["clipped"], run) / tok_total,
               "entropy": dist.all_reduce_sum(stats["entropy"], run) / tok_total,
               "value_loss": dist.all_reduce_sum(stats["vf"], run) / tok_total,
               "length": float(mask.sum(1).mean()), "exact_form": exact_form_share(asked, texts)}
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
    rl_run.write_summary(out_dir, log, dict(iter=iter_num, wall_seconds=round(time.time() - timer.start, 1),
                                            reward=reward, kl_coef=kl_coef, **rl_run.tokens_per_sec(tokens, seconds)),
                         evals, val, "PPO", "KL to the reference")
del model
dist.cleanup_ddp(run)
