"""
What the RL scripts share (grpo.py now; ppo.py next): rollouts of groups of replies with the KV-cache generator,
log-probabilities of reply tokens under a model, and the losses as functions of tensors, each checked against
hand-computed values in tests/test_rl.py.

Shapes: B replies, T = the longest reply in tokens; per-token tensors are (B, T) with mask (B, T) = 1 on a
reply's tokens (its closing stop token included) and 0 on padding.

  group_advantages  GRPO (Shao et al. 2024): a reply's reward minus its group's mean, divided by the group's std
                    (normalize=False: the mean only, "Dr. GRPO", Liu et al. 2025); 0 for a group of equal rewards
  k3_kl             per-token KL(pi || pi_ref) estimate exp(q) - q - 1 with q = log pi_ref - log pi (Schulman's
                    k3): unbiased, always >= 0
  policy_loss       the clipped surrogate (PPO, Schulman et al. 2017) -min(rho A, clip(rho, 1-eps, 1+eps) A) plus
                    beta * k3, per token; summed over tokens ("token" aggregation) or over each reply's token mean
                    ("sequence", the GRPO paper's 1/|o|); the caller divides by the global token or reply count
  gae               generalised advantage estimation (Schulman et al. 2016) over per-token rewards and values
  value_loss        PPO's clipped value loss, summed over tokens
  RewardModel       a Transformer whose last real token's final hidden state goes through one linear layer to a
                    scalar (Ouyang et al. 2022); bt_loss, its pairwise Bradley-Terry loss (optional margin)
"""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama import checkpoint as ck, dist, models
from babyllama.checkpoint import load
from babyllama.generate import generate, right_pad
from babyllama.lora import apply_lora, merge_lora
from babyllama.pairs import frozen_copy
from babyllama.poetry_rewards import exact_form, poetry_reward, requests_from
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer
from tokenizer.chat_template import decode_reply, encode_conversation, encode_prompt

# ---- rollouts and log-probabilities -------------------------------------------------------------------------

@torch.no_grad()
def rollout(model, prompts, group_size, max_new_tokens, stop_ids, device, temperature=1.0, top_p=1.0,
            generator=None):
    """group_size replies to each prompt (lists of ids), generated as one batch: returns the replies, in prompt
    order (prompt 0's group first), each a list of ids ending with its stop token when it stopped."""
    idx, lens = right_pad([p for p in prompts for _ in range(group_size)], device)
    return generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_ids=stop_ids, prompt_lens=lens, generator=generator)


def reply_batch(prompts, replies, pad_id, device):
    """(x, y) for scoring replies after their prompts: x (B, L) the right-padded prompt + reply without its last
    token, y (B, L) the next tokens, -1 outside the replies; a reply's first token is y's column len(prompt) - 1."""
    seqs = [p + r for p, r in zip(prompts, replies)]
    L = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), -1, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        x[b, :len(s) - 1] = torch.tensor(s[:-1])
        y[b, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return x.to(device), y.to(device)


def reply_logps(model, prompts, replies, pad_id, device, with_entropy=False):
    """Per-token log-probabilities (B, T) of each reply under model, the mask (B, T), and (with_entropy) the
    per-token entropy of the model's distribution (B, T), all float32, T = the longest reply. Gradients flow
    when called with grad enabled."""
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


# ---- GRPO -----------------------------------------------------------------------------------------------------

def group_advantages(rewards, group_size, normalize=True, eps=1e-4):
    """rewards (N * group_size,), each group consecutive -> advantages of the same shape: reward - group mean,
    divided by (group std + eps) when normalize (GRPO), not divided otherwise (Dr. GRPO). The std is the
    population std (divide by G)."""
    r = rewards.view(-1, group_size).float()
    a = r - r.mean(dim=1, keepdim=True)
    if normalize:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return a.reshape(-1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref): exp(q) - q - 1, q = ref_logp - logp (>= 0, 0 when equal)."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, beta=0.0, ref_logp=None, aggregation="token"):
    """The clipped policy-gradient loss of a batch, as a sum (the caller divides by the global count) and its
    metrics. logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) (one per reply, GRPO) or (B, T).
    per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3_kl(logp, ref_logp), rho = exp(logp - old_logp)
    aggregation 'token': the sum over all reply tokens; 'sequence': the sum over replies of their token mean.
    Returns (loss sum, {"kl": sum of k3 over tokens, "clipped": tokens whose ratio was clipped, "tokens": count})."""
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


# ---- PPO --------------------------------------------------------------------------------------------------------

def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Advantages and returns (B, T) from per-token rewards and values (B, T) over the masked steps:
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last step), A_t = delta_t + gamma lam A_{t+1},
    returns = A + V."""
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


# ---- the reward model ---------------------------------------------------------------------------------------

class RewardModel(nn.Module):
    """A scalar reward for a whole sequence: body (a Transformer, usually the SFT model) reads prompt + reply; the
    final normalised hidden state at the sequence's last real token goes through head (dim -> 1). Padding is on
    the right and never read: the result does not depend on how much of it there is."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.args.dim, 1)
        nn.init.normal_(self.head.weight, std=1 / (body.args.dim + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def args(self):
        return self.body.args

    def optimizer_groups(self, weight_decay, muon=False):
        """The body's AdamW grouping (Transformer.optimizer_groups), the head included. AdamW only (Muon would
        find no block matrix under the body's names: ValueError rather than a silent AdamW)."""
        if muon:
            raise ValueError("the reward model trains with AdamW, not 'muon'")
        return Transformer.optimizer_groups(self, weight_decay)

    def hidden(self, seqs, device):
        """The body's final normalised hidden states (B, L, D) of right-padded seqs (B lists of ids)."""
        x, _ = right_pad(seqs, device)
        B, L = x.shape
        return self.body._forward_positions(x, torch.arange(L, device=device).expand(B, L), None, head=False)

    def forward(self, seqs, device):
        """seqs: B lists of token ids -> rewards (B,) float32."""
        h = self.hidden(seqs, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        return self.head(h[torch.arange(len(seqs), device=device), last]).squeeze(-1).float()

    def values(self, prompts, replies, device):
        """PPO's value of every reply token's state: (B, T) float32, column t = the head read at the position
        just before reply token t (the prompt's last token for t = 0), T = the longest reply."""
        v = self.head(self.hidden([p + r[:-1] for p, r in zip(prompts, replies)], device)).squeeze(-1).float()
        out = torch.zeros((len(replies), max(len(r) for r in replies)), device=v.device)
        for b, (p, r) in enumerate(zip(prompts, replies)):
            out[b, :len(r)] = v[b, len(p) - 1:len(p) - 1 + len(r)]
        return out


def bt_loss(r_chosen, r_rejected, margin=0.0):
    """Bradley-Terry pairwise loss per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def load_reward_model(path, device="cpu"):
    """A RewardModel saved by reward_model.py (its "model": body.* and head.* weights; "model_args": the body's)."""
    ckpt = load(path, "cpu")
    if not any(k.startswith("head.") for k in ckpt.get("model", {})):
        raise ValueError(f"{path} is not a reward model checkpoint (no head.* weights): train one with reward_model.py")
    rm = RewardModel(Transformer(ModelArgs(**ckpt["model_args"])))
    lora = any("lora_" in k for k in ckpt["model"])
    if lora:  # a LoRA reward model: the adapters as trained, then folded into the weights
        cfg = ckpt["config"]
        apply_lora(rm.body, cfg["lora_rank"], cfg["lora_alpha"], 0.0, cfg["lora_targets"])
    rm.load_state_dict(ckpt["model"])
    if lora:
        merge_lora(rm.body)
    return rm.to(device).eval(), ckpt


@torch.no_grad()
def score_conversations(rm, tok, conversations, device, batch_size=16):
    """Rewards (list of floats) of conversations {"messages": [...ending with an assistant turn], "system"},
    batched; the sequences are the chat template's ids (tokenizer/chat_template.encode_conversation), cut to the
    model's context from the left."""
    seqs = [encode_conversation(tok, c["messages"], c.get("system"))[0][-rm.args.max_seq_len:] for c in conversations]
    out = []
    for i in range(0, len(seqs), batch_size):
        out += rm(seqs[i:i + batch_size], device).tolist()
    return out


# ---- what an RL run asks and how it scores ----------------------------------------------------------------------

class Requests:
    """The prompts of an RL run: poem requests (babyllama.poetry_rewards.requests_from) from a file, their
    chat-template ids (cut from the left so max_new_tokens fit the context), and each iteration's prompts and
    sampling RNG, functions of (seed, iteration, rank) only, so a resumed run samples what a straight one would.
    Raises SystemExit naming the file when it holds no request, or when no room is left for a prompt."""

    def __init__(self, tok, path, max_seq_len, max_new_tokens, seed, rank, limit=0):
        self.items = requests_from(path, limit)
        if not self.items:
            raise SystemExit(f"{path}: no poem requests (want SFT conversations or the demo's held-out questions)")
        self.room = max_seq_len - max_new_tokens
        if self.room < 8:
            raise SystemExit(f"max_new_tokens {max_new_tokens} leaves {self.room} tokens of the {max_seq_len}-token "
                             f"context for the prompt")
        self.encode = lambda r: encode_prompt(tok, [{"role": "user", "content": r}])[-self.room:]
        self.seed, self.rank = seed, rank

    def ids(self, request):
        return self.encode(request)

    def of_iteration(self, it, n):
        """The n requests of iteration it on this process."""
        g = torch.Generator().manual_seed(self.seed + it * 7919 + self.rank * 104729)
        return [self.items[int(i)] for i in torch.randint(len(self.items), (n,), generator=g)]

    def sampler(self, it, device):
        """The sampling RNG of iteration it on this process."""
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + it * 1_009 + self.rank)


def check_reward(kind):
    """SystemExit unless kind names a reward reward_function knows: 'poetry', 'model' or 'char:X'. (The scripts
    call it before loading any model.)"""
    if not (kind in ("poetry", "model") or kind.startswith("char:") and len(kind) == 6):
        raise SystemExit(f"reward must be 'poetry', 'model' or 'char:X' (one character), not {kind!r}")


def reward_function(kind, weights=(1.0, 0.5, 0.0, 0.0), tone_table="", rm=None, tok=None, device="cpu"):
    """fn(requests, replies) -> list of float rewards. kind: 'poetry' (poetry_reward with weights = (form,
    repeats, title, tones); tone_table: the JSON of build_tone_table, read when the tone weight is > 0),
    'model' (rm's scalar of the conversation), 'char:X' (the share of the reply's characters that are X)."""
    check_reward(kind)
    if kind == "poetry":
        tones = None
        if weights[3]:
            with open(tone_table, encoding="utf-8") as f:
                tones = json.load(f)
        return lambda qs, rs: [poetry_reward(q, r, *weights, tones) for q, r in zip(qs, rs)]
    if kind == "model":
        return lambda qs, rs: score_conversations(rm, tok, [{"messages": [{"role": "user", "content": q},
                                                                          {"role": "assistant", "content": r}]}
                                                            for q, r in zip(qs, rs)], device)
    return lambda qs, rs: [r.count(kind[5]) / max(len(r), 1) for r in rs]  # 'char:X'



@torch.no_grad()
def evaluate_requests(net, tok, requests, items, rewards, max_new_tokens, stop, device):
    """Greedy replies of net to the requests items (a Requests encodes them): mean reward, share of the exact
    requested form, mean reply length in tokens; and the replies."""
    was_training = net.training
    net.eval()
    out = rollout(net, [requests.ids(r) for r in items], 1, max_new_tokens, stop, device, temperature=0.0)
    net.train(was_training)
    texts = [decode_reply(tok, o) for o in out]
    r = rewards(items, texts)
    return {"reward": sum(r) / len(r), "exact_form": sum(exact_form(q, a) for q, a in zip(items, texts)) / len(texts),
            "length": sum(len(o) for o in out) / len(out)}, texts


def policy_and_reference(init_ckpt, resume_ckpt, run, seed, weight_decay, learning_rate, betas):
    """An RL script's start: the policy (init_ckpt's weights, or the resumed run's), its AdamW and DDP wrapper,
    the frozen reference (the starting weights, never trained) and the tokenizer, checked against the model.
    Returns (policy, model_args, optimizer, module, reference, tokenizer)."""
    model, model_args, start_state, init = models.finetune_model(init_ckpt, resume_ckpt, run.device, seed)
    optimizer = ck.training_optimizer(model, resume_ckpt, run, seed, weight_decay, learning_rate, betas)
    module = dist.wrap_ddp(model, run)
    ref = frozen_copy(model_args, start_state, run.device)
    tok = load_tokenizer(init.get("tokenizer", ""), model_args["vocab_size"], init.get("tokenizer_sha256", ""))
    return model, model_args, optimizer, module, ref, tok
