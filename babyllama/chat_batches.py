"""SFT's batches: conversations tokenized with the chat template, padded or packed into rows, and the loss over the
scored (assistant) tokens, summed so a batch's split into micro-steps and processes does not change it.

Shapes: B sequences per micro-batch, T positions; x (B, T) input ids, y (B, T) the next token, -1 (IGNORE) where nothing
is scored (prompts, role markers, padding)."""
import numpy as np
import torch
import torch.nn as nn

from babyllama.cross_entropy import cross_entropy
from tokenizer.chat_template import IGNORE, encode_conversation


def tokenize_conversations(convs, tok, max_seq_len):
    """(ids, labels) int64 arrays per conversation, cut to max_seq_len + 1 tokens; conversations left with no scored
    token are dropped. Returns (samples, dropped)."""
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
    """Greedy packing of samples (lengths in tokens), in order, into rows of <= max_seq_len + 1 tokens: index lists."""
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
    """SFT micro-batches, stateless: the batch of (step, micro-step) depends on nothing drawn before, so a resumed or
    DDP run sees the batches of an uninterrupted single-process run. A unit is a sample, or with pack a row of samples;
    epoch e is a permutation drawn from (seed, e); global micro-step m takes units m*B .. m*B+B-1 of the concatenated
    epochs. micro_per_step: all processes' micro-steps together (gradient_accumulation_steps)."""

    def __init__(self, samples, batch_size, micro_per_step, seed, pack, max_seq_len, pad_id):
        if not samples:
            raise ValueError("no samples: an empty training set would loop forever looking for a batch")
        self.samples, self.B, self.M, self.seed = samples, batch_size, micro_per_step, seed
        self.pack, self.max_seq_len, self.pad_id = pack, max_seq_len, pad_id
        self.lengths = np.array([len(s[0]) for s in samples])
        self._epochs, self._n_units = {}, {}

    def units(self, epoch):
        """The units of epoch (lists of sample indices), kept while that epoch is read."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.samples))
            self._epochs = {epoch: pack_rows(order, self.lengths, self.max_seq_len) if self.pack
                            else [[int(i)] for i in order]}
            self._n_units[epoch] = len(self._epochs[epoch])
        return self._epochs[epoch]

    def n_units(self, epoch):
        """How many units epoch has (remembered, so a late epoch does not repack the earlier ones)."""
        if epoch not in self._n_units:
            self.units(epoch)
        return self._n_units[epoch]

    def get(self, step, micro, device):
        """(batch dict, put): the collated micro-batch and a function moving a tensor to device (to_device_fn)."""
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
    """samples: (ids, labels) arrays -> {"x", "y": (B, T), x = ids[:-1], y = labels[1:], right-padded (targets -1),
    "n_tokens": the unpadded input positions}."""
    T = max(len(ids) for ids, _ in samples) - 1
    x = torch.full((len(samples), T), pad_id, dtype=torch.long)
    y = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(samples):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(labels[1:])
    return {"x": x, "y": y, "n_tokens": sum(len(ids) - 1 for ids, _ in samples)}


def collate_packed(rows, max_seq_len, pad_id):
    """Rows of several samples -> {"x", "y": (B, T = max_seq_len) as collate_padded, "pos": (B, T) from 0 per sample,
    "mask": (B, 1, T, T) bool, a token sees earlier tokens of its sample only (padding sees padding, so no softmax row
    is empty), "n_tokens"}."""
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
    """The model's forward with positions and mask (packed rows), as a module DDP and torch.compile can wrap."""

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
    """Mean loss per scored token (nats) of the held-out samples, padded batches, the first eval_iters (0 = all)."""
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
