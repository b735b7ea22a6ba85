"""
What the fine-tuning scripts share, as plain functions of their arguments: the batches of sft.py (conversations,
padded or packed) and of dpo.py (preference pairs), per-sequence log-probabilities of replies, the reference
model of preference tuning, and the preference losses with their metrics. The RL scripts to come (reward
model, GRPO/PPO) build on the same log-probs and reference. The training loops stay in sft.py and dpo.py.

Shapes: B sequences (or pairs) per micro-batch, T positions, V the vocabulary. Every batch has x (B, T) input
ids and y (B, T) targets, y = the next token, -1 (IGNORE) where nothing is scored: prompts, role markers,
padding. Log-probs are natural-log (nats), summed over a reply's scored tokens.
"""
from contextlib import nullcontext
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.cross_entropy import cross_entropy
from babyllama.lora import adapters_off
from model import ModelArgs, Transformer
from tokenizer.chat_template import IGNORE, encode_conversation, encode_prompt

REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge") + REFERENCE_FREE


# ---- SFT: conversations -> padded or packed batches --------------------------------------------------------

def tokenize_conversations(convs, tok, max_seq_len):
    """(ids, labels) int64 arrays per conversation through the chat template, cut to max_seq_len + 1 tokens
    (max_seq_len targets); conversations left with no scored token are dropped. Returns (samples, dropped)."""
    samples, dropped = [], 0
    for conv in convs:
        ids, labels = encode_conversation(tok, conv["messages"], conv.get("system"))
        ids, labels = ids[:max_seq_len + 1], labels[:max_seq_len + 1]
        if all(lab == IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        samples.append((np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)))
    return samples, dropped


def pack_rows(order, lengths, max_seq_len):
    """Greedy packing of samples (lengths in tokens), in the given order, into rows of at most max_seq_len + 1
    tokens (max_seq_len positions once shifted). Returns a list of rows, each a list of sample indices."""
    row_tokens = max_seq_len + 1
    rows, cur, used = [], [], 0
    for i in order:
        n = min(int(lengths[i]), row_tokens)
        if cur and used + n > row_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        rows.append(cur)
    return rows


class ConversationBatches:
    """SFT micro-batches, stateless: the batch of (step, micro-step) depends on nothing drawn before, so a
    resumed run and a DDP run see the batches of an uninterrupted single-process run. A unit is a sample, or
    with pack a row of samples; epoch e is a permutation of the samples drawn from (seed, e), and global
    micro-step m takes units m*B .. m*B+B-1 of the concatenated epochs. micro_per_step: the micro-steps of all
    processes together (gradient_accumulation_steps)."""

    def __init__(self, samples, batch_size, micro_per_step, seed, pack, max_seq_len, pad_id):
        if not samples:
            raise ValueError("no samples: an empty training set would loop forever looking for a batch")
        self.samples, self.B, self.M, self.seed = samples, batch_size, micro_per_step, seed
        self.pack, self.max_seq_len, self.pad_id = pack, max_seq_len, pad_id
        self.lengths = np.array([len(s[0]) for s in samples])
        self._epochs, self._n_units = {}, {}

    def units(self, epoch):
        """The units of epoch (lists of sample indices), computed once and kept while that epoch is read."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.samples))
            self._epochs = {epoch: pack_rows(order, self.lengths, self.max_seq_len) if self.pack
                            else [[int(i)] for i in order]}
            self._n_units[epoch] = len(self._epochs[epoch])
        return self._epochs[epoch]

    def n_units(self, epoch):
        """How many units epoch has (remembered: finding a late epoch does not pack the earlier ones again)."""
        if epoch not in self._n_units:
            self.units(epoch)
        return self._n_units[epoch]

    def get(self, step, micro, device):
        """(batch dict, put): the collated micro-batch (collate_padded / collate_packed) and a function moving
        a tensor to device (pinned and non-blocking on GPUs)."""
        picked, g = [], (step * self.M + micro) * self.B
        epoch, k = 0, g
        while len(picked) < self.B:
            if k >= self.n_units(epoch):
                k -= self.n_units(epoch)
                epoch += 1
                continue
            picked.append(self.units(epoch)[k])
            k += 1
        rows = [[self.samples[i] for i in unit] for unit in picked]
        return (collate_packed(rows, self.max_seq_len, self.pad_id) if self.pack
                else collate_padded([r[0] for r in rows], self.pad_id)), to_device_fn(device)


def to_device_fn(device):
    """A function moving a CPU tensor to device: pinned and non-blocking on GPUs, unchanged on the CPU."""
    if device.startswith("cuda"):
        return lambda t: t.pin_memory().to(device, non_blocking=True)
    return lambda t: t


def collate_padded(samples, pad_id):
    """samples: (ids, labels) arrays -> {"x", "y": (B, T) with x = ids[:-1], y = labels[1:], right-padded to
    the longest (padding targets are -1), "n_tokens": the unpadded input positions}."""
    T = max(len(ids) for ids, _ in samples) - 1
    x = torch.full((len(samples), T), pad_id, dtype=torch.long)
    y = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(samples):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(labels[1:])
    return {"x": x, "y": y, "n_tokens": sum(len(ids) - 1 for ids, _ in samples)}


def collate_packed(rows, max_seq_len, pad_id):
    """Rows of several samples each -> {"x", "y": (B, T = max_seq_len) as in collate_padded per sample, "pos":
    (B, T) positions restarting at 0 per sample, "mask": (B, 1, T, T) bool letting a token see only earlier
    tokens of its own sample (padding sees padding, so no softmax row is empty), "n_tokens"}."""
    T = max_seq_len
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, (ids, labels) in enumerate(row):
            ids, labels = ids[:T + 1], labels[:T + 1]
            n = min(len(ids) - 1, T - at)
            if n <= 0:
                break
            x[b, at:at + n] = torch.from_numpy(ids[:n])
            y[b, at:at + n] = torch.from_numpy(labels[1:n + 1])
            pos[b, at:at + n] = torch.arange(n)
            seg[b, at:at + n] = s
            at += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return {"x": x, "y": y, "pos": pos, "mask": mask.unsqueeze(1), "n_tokens": int((seg >= 0).sum())}


class PackedLM(nn.Module):
    """The model's forward with explicit positions and attention mask (packed rows), as a module so that DDP
    and torch.compile wrap it like the model. forward(x, y, pos, mask) -> (logits (B, T, V), mean loss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, pos, mask):
        """x, y, pos: (B, T) int64; mask: (B, 1, T, T) bool -> (logits (B, T, V), mean loss over y != -1)."""
        logits = self.model._forward_positions(x, pos, mask)
        return logits, cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def scored_tokens(batch):
    """How many targets of a collated batch are scored (y != -1)."""
    return int((batch["y"] != IGNORE).sum())


def sft_loss(module, batch):
    """The mean loss per scored token (nats) of a collated batch (padded, or packed with pos and mask)."""
    if "pos" in batch:
        return module(batch["x"], batch["y"], batch["pos"], batch["mask"])[1]
    return module(batch["x"], batch["y"], return_logits=False)[1]


@torch.no_grad()
def sft_validation_loss(model, samples, batch_size, eval_iters, pad_id, device, autocast):
    """Mean loss per scored token (nats) over the held-out samples in padded batches of batch_size, or over the
    first eval_iters batches (0 = all)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = (len(samples) + batch_size - 1) // batch_size
    for k in range(min(eval_iters, n_batches) if eval_iters else n_batches):
        batch = collate_padded(samples[k * batch_size:(k + 1) * batch_size], pad_id)
        n = int((batch["y"] != IGNORE).sum())
        with autocast:
            loss = sft_loss(model, {key: v.to(device) for key, v in batch.items() if key != "n_tokens"})
        total += loss.item() * n
        count += n
    model.train(was)
    return total / max(count, 1)


# ---- preference pairs -> batches -------------------------------------------------------------------------

def tokenize_pair(tok, pair, max_seq_len):
    """(prompt ids, chosen ids, rejected ids, truncated?) with prompt = the conversation so far + <|assistant|>
    and each reply = its content + <|end|> (exactly what encode_conversation gives the final assistant turn).
    Over max_seq_len + 1 tokens the prompt keeps its last half of that, then the replies are cut."""
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
    """items: B (prompt, chosen, rejected) id lists -> x, y (2B, T): rows 0..B-1 the prompt + chosen reply,
    rows B..2B-1 prompt + rejected, right-padded; y is x shifted by one with -1 on prompt and padding, so a
    row's scored targets are exactly its reply tokens."""
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
    """Micro-batches of pair indices, stateless as ConversationBatches: epoch e is a permutation drawn from
    (seed, e) and global micro-step m (get(m): a list of B indices) takes positions m*B .. m*B+B-1 of the
    concatenated epochs."""

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
    """Per row: the sum of log p(y_t) over targets y_t != -1, and how many there are. Float32 whatever the
    logits' dtype; log-softmax as gather - logsumexp so no second (B, T, V) tensor is kept for backward."""
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


# ---- the reference model -----------------------------------------------------------------------------------

def frozen_copy(model_args, state_dict, device):
    """The reference: a Transformer with the given weights, in eval mode, requiring no gradient. Built without
    touching the RNG (its random init is overwritten anyway), so a resumed run's dropout masks stay those of an
    uninterrupted run."""
    with torch.random.fork_rng(devices=[]):
        ref = Transformer(ModelArgs(**dict(model_args, dropout=0.0)))
    ref.load_state_dict(state_dict)
    ref.requires_grad_(False)
    return ref.eval().to(device)


class Reference:
    """The reference policy pi_ref of preference tuning: the summed reply log-probs (ref_c, ref_r) of a batch of
    pairs under the starting model, with one method. mode 'model': net is a frozen copy of the starting weights;
    'adapters_off': net is the LoRA policy itself, evaluated with its adapters switched off (no copy);
    'cached': read from cache = {split: (chosen (N,), rejected (N,))} computed once before training;
    'none': reference-free losses (simpo, orpo) get (None, None)."""

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
    """(logp_c, logp_r) float32 on the CPU of the pairs items[i] for i in idx under net (as it is: eval mode and
    adapters are the caller's choice); used to fill the cached reference."""
    x, y = collate_pairs([items[i] for i in idx], pad_id)
    with autocast:
        c, r, _, _ = concatenated_logps(net, x.to(device), y.to(device))
    return c.float().cpu(), r.float().cpu()


# ---- preference losses: pure functions of per-pair log-prob tensors (B,) -----------------------------------

def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, label_smoothing=0.0):
    """DPO's sigmoid loss per pair; with label_smoothing eps the preference label is trusted with prob 1-eps
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
    """log(1 - exp(x)) for x <= 0, computed stably (log(-expm1(x)) near 0, log1p(-exp(x)) far from it; Maechler
    2012). x is clamped to -1e-6 first: at x = 0 (a reply of probability 1) 1 - exp(x) is 0 and the log -inf."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(avg_c, avg_r, beta):
    """ORPO: the chosen reply's per-token NLL plus beta times the odds-ratio term, no reference.
    log odds(p) = log p - log(1 - p) with log p = avg (a mean token log-prob, so p <= 1)."""
    log_odds = (avg_c - avg_r) - (log1m_exp(avg_c) - log1m_exp(avg_r))
    loss = -avg_c - beta * F.logsigmoid(log_odds)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0,
                    simpo_gamma=0.5, sft_weight=0.0, n_pairs=None, n_chosen_tokens=None):
    """The loss (a scalar) and per-pair rewards (rc, rr), each (B,). pol_*/ref_*: summed reply log-probs (B,) of
    policy and reference (ref_* unused by simpo/orpo); n_*: reply token counts (B,).
    loss = sum of the pair losses / n_pairs + sft_weight * (the chosen replies' summed token NLL) / n_chosen_tokens.
    In training the two counts are those of the whole optimizer step (every micro-batch of every process), so the
    gradient does not depend on how the step is split; None = this batch's own (the batch mean)."""
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
    """The preference loss of the pairs items[i], i in idx (their positions in split, for the cached
    reference), in one forward pass of module, normalised by n_pairs and n_chosen_tokens (preference_loss):
    (loss, pair_metrics sums, input tokens without padding)."""
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
    """Mean pair_metrics over the held-out pairs items (every pair weighted equally), and with kinds (a label
    per pair such as "poem/shuffled", or None) "logps/accuracy_by_kind": the accuracy per label before "/"."""
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
