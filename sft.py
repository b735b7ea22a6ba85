"""
Supervised fine-tuning (chat) of a pretrained checkpoint on conversations written by sft_data_process.py.

One process:   python sft.py config/sft_demo.py
LoRA:          python sft.py config/sft_demo.py --lora_rank=8
Several GPUs:  torchrun --standalone --nproc_per_node=8 sft.py --init_ckpt=out/pretrain/ckpt.pt ...
Any global below can be overridden with --key=value after the config files.

Each conversation goes through the chat template (tokenizer/chat_template.py); the loss is taken only on the
assistant tokens of every turn and the <|end|> closing each, never on system/user turns, role markers or
padding. Batches are right-padded to their longest sample, or (pack=True) several samples share a row of
max_seq_len tokens with a block-diagonal causal mask and positions restarting at 0, so packed samples neither
attend to nor are scored across one another. Which samples form which batch depends only on (seed, step,
micro-step), so a resumed run and a DDP run see the batches of an uninterrupted single-process run.
With lora_rank > 0 only LoRA adapters train (lora.py); ckpt.pt then holds the adapter only (plus optimizer
state) and names its base checkpoint, and merged.pt holds the merged model for eval.py and export.
"""
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_overrides, config_of
from lora import build_finetune_model, lora_state_dict, merge_lora
from model import cross_entropy
from tokenizer.chat_template import IGNORE, encode_conversation
import train_utils as tu

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/sft"
train_data = "out/sft_data/train.jsonl"
val_data = "out/sft_data/val.jsonl"  # "" = no validation
init_from = "pretrain"  # 'pretrain': start from the weights of init_ckpt; 'resume': continue out_dir/ckpt.pt
init_ckpt = "out/pretrain/ckpt.pt"  # a pretrain checkpoint, or an SFT one (full or LoRA) to continue from
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt
eval_interval = 100
eval_iters = 0  # validation batches; 0 = the whole held-out split
log_interval = 10
always_save_checkpoint = True
# data
max_seq_len = 0  # 0 = the checkpoint's context; samples are cut to max_seq_len + 1 tokens
pack = False  # True: pack several samples per row (block-diagonal mask); False: pad to the batch's longest
# training
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 500
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 0  # 0 = max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0
seed = 1337
# LoRA (lora_rank = 0: full fine-tuning)
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
save_merged = True  # LoRA: also write merged.pt (base + adapter folded) at the end
# system
device = "auto"
dtype = "auto"
compile = False
num_threads = 0
max_minutes = 0.0
# -----------------------------------------------------------------------------------------------------------


def tokenize(path, tok, limit):
    """(ids, labels) per conversation, cut to `limit` tokens; conversations left with no scored token are
    dropped (sft_data_process.py's length filter normally leaves none)."""
    samples, dropped = [], 0
    for conv in tu.read_conversations(path):
        ids, labels = encode_conversation(tok, conv["messages"], conv.get("system"))
        ids, labels = ids[:limit], labels[:limit]
        if all(lab == IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        samples.append((np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)))
    return samples, dropped


def pack_rows(order, lengths, row_len):
    """Greedy packing of samples, in the given order, into rows of at most row_len tokens."""
    rows, cur, used = [], [], 0
    for i in order:
        n = min(int(lengths[i]), row_len)
        if cur and used + n > row_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        rows.append(cur)
    return rows


class Batches:
    """Training units (a sample, or a packed row of samples) for (step, micro-step), stateless: epoch e is a
    permutation of the samples drawn from (seed, e); global micro-step m takes units m*B .. m*B+B-1 of the
    concatenated epochs."""

    def __init__(self, samples, batch_size, micro_per_step, seed, pack, row_len, pad_id):
        self.samples, self.B, self.M, self.seed = samples, batch_size, micro_per_step, seed
        self.pack, self.row_len, self.pad_id = pack, row_len, pad_id
        self.lengths = np.array([len(s[0]) for s in samples])
        self._epochs = {}

    def units(self, epoch):
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.samples))
            self._epochs = {epoch: pack_rows(order, self.lengths, self.row_len) if self.pack
                            else [[int(i)] for i in order]}
        return self._epochs[epoch]

    def get(self, step, micro, device):
        picked, g = [], (step * self.M + micro) * self.B
        epoch, k = 0, g
        while len(picked) < self.B:
            units = self.units(epoch)
            if k >= len(units):
                k -= len(units)
                epoch += 1
                continue
            picked.append(units[k])
            k += 1
        rows = [[self.samples[i] for i in unit] for unit in picked]
        return (collate_packed(rows, self.row_len, self.pad_id) if self.pack
                else collate_padded([r[0] for r in rows], self.pad_id)), to_device_fn(device)


def to_device_fn(device):
    if device.startswith("cuda"):
        return lambda t: t.pin_memory().to(device, non_blocking=True)
    return lambda t: t


def collate_padded(samples, pad_id):
    """x = ids[:-1], y = labels[1:], right-padded to the longest (pad targets are -1)."""
    T = max(len(ids) for ids, _ in samples) - 1
    x = torch.full((len(samples), T), pad_id, dtype=torch.long)
    y = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(samples):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(labels[1:])
    return {"x": x, "y": y, "n_tokens": sum(len(ids) - 1 for ids, _ in samples)}


def collate_packed(rows, row_len, pad_id):
    """Rows of several samples each: x, y as above per sample, positions restarting at 0 per sample, and a
    boolean mask (B, 1, T, T) allowing a token to see only earlier tokens of its own sample (padding sees
    padding, so no softmax row is empty)."""
    T = row_len - 1
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
    """Forward with explicit positions and attention mask (packed rows), wrapped as a module so DDP sees it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, pos, mask):
        logits = self.model._forward_positions(x, pos, mask)
        return logits, cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def forward(module, batch):
    if "pos" in batch:
        return module(batch["x"], batch["y"], batch["pos"], batch["mask"])[1]
    return module(batch["x"], batch["y"], return_logits=False)[1]


@torch.no_grad()
def validation_loss(model, samples, pad_id, device, autocast_ctx):
    """Mean loss per scored token over the held-out samples (or the first eval_iters batches)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = (len(samples) + batch_size - 1) // batch_size
    for k in range(n_batches if not eval_iters else min(eval_iters, n_batches)):
        batch = collate_padded(samples[k * batch_size:(k + 1) * batch_size], pad_id)
        n = int((batch["y"] != IGNORE).sum())
        with autocast_ctx:
            loss = forward(model, {k2: v.to(device) for k2, v in batch.items() if k2 != "n_tokens"})
        total += loss.item() * n
        count += n
    model.train(was)
    return total / max(count, 1)


if __name__ == "__main__":
    config_keys = list(config_of(globals()))
    apply_overrides(globals())
    config = {k: globals()[k] for k in config_keys}

    # ---- set-up -------------------------------------------------------------------------------------------
    ctx = tu.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir)
    device, device_type, master, accum = ctx["device"], ctx["device_type"], ctx["master"], ctx["accum"]
    dtype, autocast_ctx, scaler = ctx["dtype"], ctx["autocast"], ctx["scaler"]
    lr_decay_iters = lr_decay_iters or max_iters

    # ---- model --------------------------------------------------------------------------------------------
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    iter_num, best_val_loss, resume_ckpt = 0, float("inf"), None
    if init_from == "resume":
        resume_ckpt = tu.load_checkpoint(ckpt_path, device)
        init_ckpt = resume_ckpt["init_ckpt"]
        iter_num, best_val_loss = resume_ckpt["iter_num"], resume_ckpt["best_val_loss"]
        if "lora" in resume_ckpt:
            lora_rank = resume_ckpt["lora_config"]["rank"]
    elif init_from != "pretrain":
        raise SystemExit(f"init_from must be 'pretrain' or 'resume', not {init_from!r}")
    model, model_args, _, init = build_finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len, dropout,
                                                      lora_rank, lora_alpha, lora_dropout, lora_targets)
    raw_model = model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    tu.restore_or_seed(resume_ckpt, optimizer, scaler, ctx, seed, iter_num)
    tok = tu.load_tokenizer(tokenizer_model or init.get("tokenizer", ""), model_args["vocab_size"])
    pad_id = tok.pad_id if tok.pad_id >= 0 else 0
    if master:
        print(f"{ctx['world_size']} process(es) on {device}, {dtype}; from {init_ckpt}"
              + (f" (resumed at iteration {iter_num})" if resume_ckpt is not None else ""))
        print(f"parameters: {raw_model.num_params() / 1e6:.2f}M, trainable: {n_trainable:,}"
              + (f" (LoRA rank {lora_rank}, alpha {lora_alpha}, targets {lora_targets})" if lora_rank else ""))
    del resume_ckpt

    # ---- data ---------------------------------------------------------------------------------------------
    T1 = model_args["max_seq_len"] + 1
    train_samples, dropped = tokenize(train_data, tok, T1)
    val_samples = tokenize(val_data, tok, T1)[0] if val_data else []
    batches = Batches(train_samples, batch_size, gradient_accumulation_steps, seed, pack, T1, pad_id)
    if master:
        scored = sum(int((s[1][1:] != IGNORE).sum()) for s in train_samples)
        print(f"train: {len(train_samples):,} conversations ({dropped} without scored tokens dropped), "
              f"{int(batches.lengths.sum()):,} tokens of which {scored:,} scored; val: {len(val_samples):,}; "
              + (f"packed into {len(batches.units(0)):,} rows of {T1 - 1}" if pack else "padded batches"))

    module = PackedLM(model) if pack else model
    if compile:
        module = torch.compile(module)
    if ctx["ddp"]:
        module = DDP(module, device_ids=[ctx["local_rank"]] if device_type == "cuda" else None)

    def save(path):
        rngs = tu.gather_rng_states(ctx)
        if not master:
            return
        state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
                 "rng": rngs, "init_ckpt": init_ckpt, "tokenizer": tok.model_path, "tokenizer_sha256": tok.sha256(),
                 "data": {"sampler": "stateless", "seed": seed, "train": train_data}}
        if lora_rank:  # adapter only; the base weights are those of init_ckpt
            state.update(lora=lora_state_dict(raw_model), lora_config=raw_model.lora_config, base_ckpt=init_ckpt)
        else:
            state["model"] = raw_model.state_dict()
        tu.save_checkpoint(path, state)

    # ---- training loop ------------------------------------------------------------------------------------
    log = tu.JsonlLog(os.path.join(out_dir, "log.jsonl"), resume=init_from == "resume") if master else None
    t_start = t0 = time.time()
    first_iter = iter_num
    resumed = init_from == "resume"
    tokens_seen = 0
    while True:
        lr = tu.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out_of_time = max_minutes and (time.time() - t_start) / 60 >= max_minutes
        last = iter_num >= max_iters or out_of_time
        saved = False
        if val_samples and (iter_num % eval_interval == 0 or last) and not (resumed and iter_num == first_iter):
            val_loss = validation_loss(raw_model, val_samples, pad_id, device, autocast_ctx)
            tu.check_finite(val_loss, iter_num, out_dir)
            if master:
                print(f"iter {iter_num}: val loss {val_loss:.4f}")
                log.write(iter=iter_num, val_loss=val_loss, lr=lr)
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            if iter_num > first_iter and (improved or always_save_checkpoint):
                save(ckpt_path)
                saved = True
        if last:
            if iter_num > first_iter and not saved:
                save(ckpt_path)
            break

        loss_sum, n_tok = 0.0, 0
        for micro in range(accum):
            batch, put = batches.get(iter_num, ctx["rank"] * accum + micro, device)
            n_tok += batch.pop("n_tokens")
            batch = {k: put(v) for k, v in batch.items()}
            sync = not ctx["ddp"] or micro == accum - 1
            with (nullcontext() if sync else module.no_sync()):
                with autocast_ctx:
                    loss = forward(module, batch) / accum  # mean over micro-batches of the per-token mean
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_value = tu.all_reduce_mean(float(loss_sum), ctx)
        if not scaler.is_enabled():
            tu.check_finite(loss_value, iter_num, out_dir)
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        n_tok = int(tu.all_reduce_mean(n_tok, ctx) * ctx["world_size"])
        tokens_seen += n_tok
        if master and iter_num % log_interval == 0:
            print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, {n_tok / dt:,.0f} tok/s")
            log.write(iter=iter_num, loss=loss_value, lr=lr, dt_ms=dt * 1000, tokens_per_sec=n_tok / dt)
        iter_num += 1

    elapsed = time.time() - t_start
    if master:
        mem = tu.peak_memory_mb(device_type)
        summary = dict(iter=iter_num, trainable_params=n_trainable, peak_memory_mb=round(mem, 1),
                       train_tokens=tokens_seen, train_seconds=round(elapsed, 1),
                       tokens_per_sec=round(tokens_seen / max(elapsed, 1e-9), 1), best_val_loss=best_val_loss)
        log.write(summary=summary)
        log.close()
        tu.plot_log(log.path, os.path.join(out_dir, "loss.png"))
        print(f"summary: {summary}")
        if lora_rank and save_merged:
            merge_lora(raw_model)
            tu.save_checkpoint(os.path.join(out_dir, "merged.pt"), {
                "model": raw_model.state_dict(), "model_args": model_args, "iter_num": iter_num, "config": config,
                "tokenizer": tok.model_path, "tokenizer_sha256": tok.sha256(), "init_ckpt": init_ckpt})
            print(f"merged model: {os.path.join(out_dir, 'merged.pt')}")
        print(f"done: {iter_num} iterations in {elapsed / 60:.1f} min; checkpoint {ckpt_path}")
    tu.cleanup_ddp(ctx)
