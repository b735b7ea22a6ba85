"""The RL algorithms' pieces as functions of tensors (grpo.py, ppo.py): rollouts of reply groups, reply-token
log-probabilities, advantages (GRPO's, GAE) and the losses (clipped policy, PPO's value), each checked against
hand-computed values in tests/unit/test_rl.py. The run around a loop is babyllama/rl_run.py's.

Shapes: B replies, T = the longest reply in tokens; per-token tensors are (B, T), mask (B, T) = 1 on a reply's tokens
(its stop token included), 0 on padding."""
import torch
import torch.nn.functional as F

from babyllama.generate import generate, right_pad

# ---- rollouts and log-probabilities -------------------------------------------------------------------------

@torch.no_grad()
def rollout(model, prompts, group_size, max_new_tokens, stop_ids, device, temperature=1.0, top_p=1.0,
            generator=None):
    """group_size replies to each prompt (lists of ids), generated as one batch, prompt 0's group first; each a list of
    ids ending with its stop token when it stopped."""
    idx, lens = right_pad([p for p in prompts for _ in range(group_size)], device)
    return generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=stop_ids,
                    prompt_lens=lens, generator=generator)


def reply_batch(prompts, replies, pad_id, device):
    """(x, y) for scoring replies after their prompts: x (B, L) right-padded prompt + reply minus its last token, y (B,
    L) the next tokens, -1 outside the replies (a reply starts at y's column len(prompt) - 1)."""
    seqs = [p + r for p, r in zip(prompts, replies)]
    L = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), -1, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        x[b, :len(s) - 1] = torch.tensor(s[:-1])
        y[b, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return x.to(device), y.to(device)


def reply_logps(model, prompts, replies, pad_id, device, with_entropy=False):
    """Per-token log-probabilities (B, T) of each reply under model, the mask (B, T), and (with_entropy) the per-token
    entropy (B, T), all float32. Gradients flow when grad is enabled."""
    x, y = reply_batch(prompts, replies, pad_id, device)
    logits, _ = model(x)
    logp_all = F.log_softmax(logits.float(), dim=-1)
    T = max(len(r) for r in replies)
    B = len(replies)
    logp = torch.zeros((B, T), device=logits.device)
    ent = torch.zeros((B, T), device=logits.device) if with_entropy else None
    mask = torch.zeros((B, T), device=logits.device)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        cols = torch.arange(len(p) - 1, len(p) - 1 + len(r), device=logits.device)
        logp[b, :len(r)] = logp_all[b, cols].gather(-1, y[b, cols].unsqueeze(-1)).squeeze(-1)
        mask[b, :len(r)] = 1.0
        if with_entropy:
            ent[b, :len(r)] = -(logp_all[b, cols].exp() * logp_all[b, cols]).sum(-1)
    return logp, mask, ent


# ---- GRPO's advantages, the clipped policy loss (both algorithms) ------------------------------------------

def group_advantages(rewards, group_size, normalize=True, eps=1e-4):
    """rewards (N * group_size,), groups consecutive -> advantages, same shape: reward - group mean, divided by (the
    group's population std + eps) when normalize (GRPO, Shao et al. 2024), else not ("Dr. GRPO", Liu et al. 2025)."""
    r = rewards.view(-1, group_size).float()
    a = r - r.mean(dim=1, keepdim=True)
    if normalize:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return a.reshape(-1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate (Schulman) of KL(pi || pi_ref): exp(q) - q - 1, q = ref_logp - logp; unbiased, >= 0."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, beta=0.0, ref_logp=None, aggregation="token"):
    """The clipped surrogate loss (PPO, Schulman et al. 2017) of a batch as a sum (the caller divides by the global
    count). logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) (GRPO) or (B, T). Per token: -min(rho A, clip(rho,
    1 - eps, 1 + eps) A) + beta * k3_kl, rho = exp(logp - old_logp). aggregation 'token': summed over reply tokens;
    'sequence': over replies of their token mean (the GRPO paper's 1/|o|). Returns (loss sum, {"kl": k3 summed over
    tokens, "clipped": tokens clipped, "tokens": count})."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = per_token + beta * kl
    if aggregation == "token":
        loss = (per_token * mask).sum()
    elif aggregation == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', not {aggregation!r}")
    with torch.no_grad():
        clipped = ((ratio - ratio.clamp(1 - clip_eps, 1 + clip_eps)).abs() > 0).float()
        stats = {"kl": float((kl * mask).sum()), "clipped": float((clipped * mask).sum()),
                 "tokens": float(mask.sum())}
    return loss, stats


def minibatch_policy_loss(model, prompts, replies, idx, old_logp, ref_logp, advantages, pad_id, device,
                          clip_eps=0.2, beta=0.0, aggregation="token"):
    """policy_loss of the rollout rows idx, re-scored by model with grad (the training forward), against the rollout's
    old_logp, ref_logp (B, T) and advantages (B,) or (B, T), cut to the minibatch's longest reply. Returns (loss sum,
    policy_loss's stats plus "entropy" summed over the reply tokens)."""
    logp, mask, ent = reply_logps(model, [prompts[i] for i in idx], [replies[i] for i in idx], pad_id, device,
                                  with_entropy=True)
    T = logp.shape[1]
    adv = advantages[idx] if advantages.dim() == 1 else advantages[idx, :T]
    loss, stats = policy_loss(logp, old_logp[idx, :T], adv, mask, clip_eps, beta, ref_logp[idx, :T], aggregation)
    stats["entropy"] = float((ent * mask).sum().detach())
    return loss, stats


# ---- PPO --------------------------------------------------------------------------------------------------------

def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016): advantages and returns (B, T) from per-token rewards and
    values (B, T) over the masked steps: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last step), A_t = delta_t
    + gamma lam A_{t+1}, returns = A + V."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def value_loss(values, old_values, returns, mask, clip=0.2):
    """PPO's clipped value loss summed over masked tokens: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * (torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum()
