"""Preference pairs in training (dpo.py, reward_model.py): pair batches, per-reply log-probabilities, the frozen
reference, the DPO-family losses (sigmoid, IPO, hinge, SimPO, ORPO) with their metrics, and held-out evaluation.

Shapes: B pairs per micro-batch; chosen and rejected go through the model together (2B rows, chosen first); x, y (2B,
T), y the next token or -1 (IGNORE) where nothing is scored. Log-probs in nats, summed over a reply's tokens."""
from contextlib import nullcontext
import math

import numpy as np
import torch
import torch.nn.functional as F

from babyllama.lora import adapters_off
from tokenizer.chat_template import IGNORE, encode_prompt

REFERENCE_FREE = ("simpo", "orpo")


LOSS_TYPES = ("sigmoid", "ipo", "hinge") + REFERENCE_FREE


def tokenize_pair(tok, pair, max_seq_len):
    """(prompt ids, chosen ids, rejected ids, truncated?): the prompt ends with <|assistant|>, each reply with <|end|>
    (as encode_conversation). Past max_seq_len + 1 tokens the prompt keeps at most its last half; replies are cut."""
    n_max = max_seq_len + 1  # tokens of prompt + reply
    prompt = encode_prompt(tok, pair["prompt"], pair.get("system"))
    replies = [tok.encode(pair[k]) + [tok.end_id] for k in ("chosen", "rejected")]
    truncated = False
    if len(prompt) + max(map(len, replies)) > n_max:
        truncated = True
        prompt = prompt[-(n_max // 2):] if len(prompt) > n_max // 2 else prompt
        replies = [r[:n_max - len(prompt)] for r in replies]
    return prompt, replies[0], replies[1], truncated


def collate_pairs(items, pad_id):
    """items: B (prompt, chosen, rejected) id lists -> x, y (2B, T): rows 0..B-1 prompt + chosen, B..2B-1 prompt +
    rejected, right-padded; y is x shifted by one, -1 on prompt and padding, so only reply tokens are scored."""
    seqs = [p + c for p, c, _ in items] + [p + r for p, _, r in items]
    labels = [[IGNORE] * len(p) + c for p, c, _ in items] + [[IGNORE] * len(p) + r for p, _, r in items]
    T = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labels)):
        x[b, :len(s) - 1] = torch.tensor(s[:-1])
        y[b, :len(s) - 1] = torch.tensor(lab[1:])
    return x, y


class PairBatches:
    """Micro-batches of pair indices, stateless as ConversationBatches: epoch e is a permutation drawn from (seed, e);
    global micro-step m (get(m): B indices) takes positions m*B .. m*B+B-1 of the concatenated epochs."""

    def __init__(self, n, batch_size, seed):
        if n <= 0:
            raise ValueError("no pairs: an empty training set has no batches")
        self.n, self.B, self.seed, self._perm = n, batch_size, seed, {}

    def perm(self, epoch):
        """The permutation of pair indices for epoch (the latest one is kept)."""
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, 11, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def get(self, global_micro):
        """The B pair indices of global micro-step global_micro."""
        g = global_micro * self.B
        return [int(self.perm((g + k) // self.n)[(g + k) % self.n]) for k in range(self.B)]


def sequence_logps(logits, y):
    """Per row: the sum of log p(y_t) over targets y_t != -1, and their count; float32 whatever the logits' dtype
    (gather - logsumexp: no second (B, T, V) tensor kept for backward)."""
    mask = y != IGNORE
    logits = logits.float()
    picked = logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def concatenated_logps(module, x, y):
    """One forward pass over chosen and rejected rows together -> (logp_c, logp_r, n_c, n_r), each (B,)."""
    logits, _ = module(x)
    logps, counts = sequence_logps(logits, y)
    B = x.shape[0] // 2
    return logps[:B], logps[B:], counts[:B], counts[B:]


class Reference:
    """The reference policy pi_ref: the summed reply log-probs (ref_c, ref_r) of a batch of pairs under the starting
    model. mode 'model': net is a frozen copy; 'adapters_off': the LoRA policy with adapters off (no copy); 'cached':
    cache = {split: (chosen (N,), rejected (N,))} computed before training; 'none' (simpo, orpo): (None, None)."""

    def __init__(self, mode, net=None, cache=None, autocast=nullcontext()):
        self.mode, self.net, self.cache, self.autocast = mode, net, cache, autocast

    @torch.no_grad()
    def logps(self, x, y, split, idx):
        """(ref_c, ref_r), each (B,), for the pairs idx (their positions in split) collated as x, y."""
        if self.mode == "none":
            return None, None
        if self.mode == "cached":
            c, r = self.cache[split]
            return c[idx].to(x.device), r[idx].to(x.device)
        was = self.net.training
        self.net.eval()
        with self.autocast, (adapters_off(self.net) if self.mode == "adapters_off" else nullcontext()):
            c, r, _, _ = concatenated_logps(self.net, x, y)
        self.net.train(was)
        return c, r


@torch.no_grad()
def pair_logps(net, items, idx, pad_id, device, autocast):
    """(logp_c, logp_r) float32 on the CPU of items[i], i in idx, under net as it is (eval mode and adapters are the
    caller's); fills the cached reference."""
    x, y = collate_pairs([items[i] for i in idx], pad_id)
    with autocast:
        c, r, _, _ = concatenated_logps(net, x.to(device), y.to(device))
    return c.float().cpu(), r.float().cpu()


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, label_smoothing=0.0):
    """DPO's sigmoid loss per pair (Rafailov et al. 2023); label_smoothing eps trusts the label with prob 1-eps
    (conservative DPO). Returns (loss, reward_chosen, reward_rejected)."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * (pol_c - ref_c).detach(), beta * (pol_r - ref_r).detach()


def ipo_loss(pol_c, pol_r, ref_c, ref_r, beta):
    """IPO: regress the log-ratio difference h onto 1/(2 beta) instead of pushing it to infinity."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    return (h - 1 / (2 * beta)) ** 2, beta * (pol_c - ref_c).detach(), beta * (pol_r - ref_r).detach()


def hinge_loss(pol_c, pol_r, ref_c, ref_r, beta):
    """SLiC's hinge: zero once beta * h exceeds 1."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    return torch.relu(1 - beta * h), beta * (pol_c - ref_c).detach(), beta * (pol_r - ref_r).detach()


def simpo_loss(avg_c, avg_r, beta, gamma, label_smoothing=0.0):
    """SimPO on length-normalised log-probs (avg = logp / reply tokens), no reference; reward = beta * avg."""
    z = beta * (avg_c - avg_r) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def log1m_exp(x):
    """log(1 - exp(x)) for x <= 0, stably (Maechler 2012); x is clamped to -1e-6 first (at x = 0 the log is -inf)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(avg_c, avg_r, beta):
    """ORPO: the chosen reply's per-token NLL plus beta times the odds-ratio term, no reference; log odds(p) = log p -
    log(1 - p), log p = avg (a mean token log-prob)."""
    log_odds = (avg_c - avg_r) - (log1m_exp(avg_c) - log1m_exp(avg_r))
    loss = -avg_c - beta * F.logsigmoid(log_odds)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0,
                    simpo_gamma=0.5, sft_weight=0.0, n_pairs=None, n_chosen_tokens=None):
    """The loss (a scalar) and per-pair rewards (rc, rr), each (B,). pol_*/ref_*: summed reply log-probs (B,) of policy
    and reference (unused by simpo/orpo); n_*: reply token counts (B,). loss = sum of pair losses / n_pairs + sft_weight
    * chosen replies' summed NLL / n_chosen_tokens; in training both counts are the whole optimizer step's, so the
    gradient does not depend on how the step is split; None = this batch's own."""
    if loss_type == "sigmoid":
        losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, label_smoothing)
    elif loss_type == "ipo":
        losses, rc, rr = ipo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    elif loss_type == "hinge":
        losses, rc, rr = hinge_loss(pol_c, pol_r, ref_c, ref_r, beta)
    elif loss_type == "simpo":
        losses, rc, rr = simpo_loss(pol_c / n_c, pol_r / n_r, beta, simpo_gamma, label_smoothing)
    elif loss_type == "orpo":
        losses, rc, rr = orpo_loss(pol_c / n_c, pol_r / n_r, beta)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    loss = losses.sum() / (len(losses) if n_pairs is None else n_pairs)
    if sft_weight:  # NLL per chosen token
        loss = loss + sft_weight * (-pol_c.sum() / (n_c.sum() if n_chosen_tokens is None else n_chosen_tokens))
    return loss, rc, rr


def pair_metrics(loss, pol_c, pol_r, rc, rr):
    """TRL's metric names -> float sums over the pairs (divide by the pair count for means)."""
    return {"loss": float(loss) * len(rc), "rewards/chosen": float(rc.sum()), "rewards/rejected": float(rr.sum()),
            "rewards/margins": float((rc - rr).sum()), "rewards/accuracies": float((rc > rr).float().sum()),
            "logps/chosen": float(pol_c.detach().sum()), "logps/rejected": float(pol_r.detach().sum()),
            # the model's own preference, no reference: does it give the chosen reply the higher log-prob?
            "logps/accuracy": float((pol_c > pol_r).float().sum()), "logps/margin": float((pol_c - pol_r).detach().sum())}


def pair_batch_loss(module, reference, items, idx, split, pad_id, device, autocast, loss_type, n_pairs=None,
                    n_chosen_tokens=None, **loss_args):
    """The preference loss of items[i], i in idx (their positions in split, for the cached reference), in one forward
    pass, normalised as preference_loss: (loss, pair_metrics sums, input tokens without padding)."""
    x, y = collate_pairs([items[i] for i in idx], pad_id)
    x, y = x.to(device), y.to(device)
    ref_c, ref_r = reference.logps(x, y, split, torch.tensor(idx))
    with autocast:
        pol_c, pol_r, n_c, n_r = concatenated_logps(module, x, y)
    loss, rc, rr = preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, n_c, n_r, n_pairs=n_pairs,
                                   n_chosen_tokens=n_chosen_tokens, **loss_args)
    return loss, pair_metrics(loss.detach(), pol_c, pol_r, rc, rr), int((x != pad_id).sum())


@torch.no_grad()
def evaluate_pairs(model, reference, items, kinds, batch_size, pad_id, device, autocast, loss_type, **loss_args):
    """Mean pair_metrics over the held-out pairs (each weighted equally); with kinds (a label per pair such as
    "poem/shuffled", or None) also "logps/accuracy_by_kind", the accuracy per label before "/"."""
    was = model.training
    model.eval()
    sums, by_kind = {}, {}
    for s in range(0, len(items), batch_size):
        idx = list(range(s, min(s + batch_size, len(items))))
        x, y = collate_pairs([items[i] for i in idx], pad_id)
        x, y = x.to(device), y.to(device)
        ref_c, ref_r = reference.logps(x, y, "val", torch.tensor(idx))
        with autocast:
            pol_c, pol_r, n_c, n_r = concatenated_logps(model, x, y)
        for k, i in enumerate(idx):  # per pair, so the mean weights every pair equally
            one = slice(k, k + 1)
            loss, rc, rr = preference_loss(loss_type, pol_c[one], pol_r[one], None if ref_c is None else ref_c[one],
                                           None if ref_r is None else ref_r[one], n_c[one], n_r[one], **loss_args)
            m = pair_metrics(loss, pol_c[one], pol_r[one], rc, rr)
            for name, v in m.items():
                sums[name] = sums.get(name, 0.0) + v
            if kinds is not None and kinds[i]:
                acc = by_kind.setdefault(kinds[i].split("/")[0], [0, 0])
                acc[0] += m["logps/accuracy"]
                acc[1] += 1
    model.train(was)
    out = {k: v / max(len(items), 1) for k, v in sums.items()}
    if by_kind:
        out["logps/accuracy_by_kind"] = {k: a / n for k, (a, n) in sorted(by_kind.items())}
    return out
