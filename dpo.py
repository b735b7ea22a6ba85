"""
Direct Preference Optimization (Rafailov et al. 2023) and its common variants, on pairs (prompt, chosen reply,
rejected reply) that preference_data.py reads; starts from an SFT checkpoint.

One process:   python dpo.py config/dpo_demo.py
LoRA:          python dpo.py config/dpo_demo.py --lora_rank=8   (the reference is the base, adapters off)
Cached ref:    python dpo.py config/dpo_demo.py --reference=cached
Several GPUs:  torchrun --standalone --nproc_per_node=8 dpo.py --init_ckpt=out/sft/ckpt.pt --train_data=...
Any global below can be overridden with --key=value after the config files.

The idea. A policy pi (being trained) and a frozen reference pi_ref (the starting SFT model). For a pair,
the log-probability of each whole reply given the prompt, summed over the reply's tokens only:
    logp(y|x) = sum_t log pi(y_t | x, y_<t)
DPO's implicit reward of a reply is r = beta * (logp_pi(y|x) - logp_ref(y|x)), and the loss asks the chosen
reply's reward to exceed the rejected one's:
    loss = -log sigmoid(r_chosen - r_rejected)
At step 0 pi == pi_ref, every reward is 0 and the loss is log 2 = 0.693. The logged metrics (as TRL names them):
rewards/chosen, rewards/rejected (mean r), rewards/margins (mean r_c - r_r), rewards/accuracies (share of pairs
with r_c > r_r), logps/chosen, logps/rejected (the policy's mean summed log-probs). Healthy DPO: margins and
accuracies rise; watch logps/chosen too: when both log-probs fall, the policy is drifting away from the data.
Also logged: logps/accuracy and logps/margin, the model's own preference without a reference (share of pairs
with logp(chosen) > logp(rejected), mean difference): on the held-out pairs at iteration 0 they are the SFT
model's, at the end the DPO model's (the before/after comparison the run prints; per pair kind when labelled).

Variants (loss_type), h = (logp_pi(c) - logp_ref(c)) - (logp_pi(r) - logp_ref(r)):
    sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)   (DPO; eps = label_smoothing > 0 is conservative DPO)
    ipo      (h - 1/(2 beta))^2                            (IPO, Azar et al. 2023)
    hinge    max(0, 1 - beta h)                            (SLiC)
    simpo    -log s(beta (avg_c - avg_r) - gamma)          (SimPO; reference-free, avg = logp / reply tokens)
    orpo     -avg_c - beta log s(log odds(c) - log odds(r)), odds = p / (1 - p), p = exp(avg)  (ORPO; ref-free)
sft_weight > 0 adds sft_weight * (mean NLL of the chosen replies' tokens) to any of them.

Reference (reference): 'model' keeps a frozen copy of the starting weights (with LoRA: the same model with its
adapters switched off, no copy); 'cached' computes the reference log-probs once before training, with the
policy itself before its first update, for the held-out pairs and every training pair the run will visit (the
sampler is stateless, so they are known in advance), saves them in out_dir/ref_logps.pt and keeps no reference
model at all: one forward pass less per step and no second copy of the weights. simpo and orpo need none.
Chosen and rejected go through the model in one forward pass (2B rows: chosen first), right-padded; the
targets are -1 on the prompt and padding, so only reply tokens (and the <|end|> closing the reply) count.
"""
import math
import os
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_overrides, config_of
from lora import LoRALinear, build_finetune_model, load_checkpoint_model, lora_state_dict, merge_lora
from model import ModelArgs, Transformer
from preference_data import load_preferences
from tokenizer.chat_template import IGNORE, decode_reply, encode_prompt, stop_ids
import train_utils as tu

# -----------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out/dpo"
train_data = "out/dpo_data/train.jsonl"  # comma-separated; .json, .jsonl or .parquet in any format above
val_data = "out/dpo_data/val.jsonl"  # held-out pairs; "" = none
init_from = "sft"  # 'sft': start from init_ckpt; 'resume': continue out_dir/ckpt.pt
init_ckpt = "out/sft/ckpt.pt"  # an SFT checkpoint (full or LoRA), or any checkpoint this project writes
tokenizer_model = ""  # "" = the tokenizer recorded in init_ckpt
eval_interval = 50
log_interval = 1
n_samples = 4  # held-out prompts generated from before and after training, at the end (0 = none)
# DPO
loss_type = "sigmoid"  # 'sigmoid' (DPO), 'ipo', 'hinge', 'simpo', 'orpo'
beta = 0.1
label_smoothing = 0.0  # > 0 with sigmoid: conservative DPO (cDPO); also used by simpo
simpo_gamma = 0.5  # SimPO's target reward margin
sft_weight = 0.0  # > 0: add this times the NLL of the chosen reply
reference = "model"  # 'model' (frozen copy; adapters off with LoRA) or 'cached'; ignored by simpo/orpo
# data
max_seq_len = 0  # 0 = the checkpoint's context; prompt + reply are cut to max_seq_len + 1 tokens
# training
batch_size = 8  # pairs per micro-batch (2 * batch_size sequences per forward pass)
gradient_accumulation_steps = 1
max_iters = 200
learning_rate = 5e-6
min_lr = 5e-7
warmup_iters = 10
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
save_merged = True  # LoRA: also write merged.pt at the end
# system
device = "auto"
dtype = "auto"
compile = False
num_threads = 0
max_minutes = 0.0
# -----------------------------------------------------------------------------------------------------------

REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge") + REFERENCE_FREE


# ---- the losses: pure functions of per-pair log-prob tensors (B,) -------------------------------------------

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


def orpo_loss(avg_c, avg_r, beta):
    """ORPO: the chosen reply's per-token NLL plus beta times the odds-ratio term, no reference.
    log odds(p) = log p - log(1 - p) with log p = avg (a mean token log-prob, so p < 1)."""
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    loss = -avg_c - beta * F.logsigmoid(log_odds)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0,
                    simpo_gamma=0.5, sft_weight=0.0):
    """The batch loss (a scalar: mean over pairs, plus the optional SFT term) and per-pair rewards.
    pol_*/ref_*: summed reply log-probs (B,) of policy and reference (ref_* unused by simpo/orpo);
    n_*: reply token counts (B,)."""
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
    loss = losses.mean()
    if sft_weight:
        loss = loss + sft_weight * (-pol_c.sum() / n_c.sum())  # mean NLL per chosen token
    return loss, rc, rr


def pair_metrics(loss, pol_c, pol_r, rc, rr):
    """TRL's metric names -> float sums over the pairs (divide by the pair count for means)."""
    return {"loss": float(loss) * len(rc), "rewards/chosen": float(rc.sum()), "rewards/rejected": float(rr.sum()),
            "rewards/margins": float((rc - rr).sum()), "rewards/accuracies": float((rc > rr).float().sum()),
            "logps/chosen": float(pol_c.detach().sum()), "logps/rejected": float(pol_r.detach().sum()),
            # the model's own preference, no reference: does it give the chosen reply the higher log-prob?
            "logps/accuracy": float((pol_c > pol_r).float().sum()), "logps/margin": float((pol_c - pol_r).detach().sum())}


# ---- sequences -------------------------------------------------------------------------------------------

def tokenize_pair(tok, pair, limit):
    """(prompt ids, chosen ids, rejected ids, truncated?) with prompt = the conversation so far + <|assistant|>
    and each reply = its content + <|end|> (exactly what encode_conversation gives the final assistant turn).
    Over `limit` tokens the prompt keeps its last limit//2 tokens, then the replies are cut."""
    prompt = encode_prompt(tok, pair["prompt"], pair.get("system"))
    replies = [tok.encode(pair[k]) + [tok.end_id] for k in ("chosen", "rejected")]
    truncated = False
    if len(prompt) + max(map(len, replies)) > limit:
        truncated = True
        prompt = prompt[-(limit // 2):] if len(prompt) > limit // 2 else prompt
        replies = [r[:limit - len(prompt)] for r in replies]
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


def frozen_copy(model_args, state_dict, device):
    """The reference: a Transformer with the given weights, in eval mode, requiring no gradient."""
    ref = Transformer(ModelArgs(**dict(model_args, dropout=0.0)))
    ref.load_state_dict(state_dict)
    ref.requires_grad_(False)
    return ref.eval().to(device)


@contextmanager
def adapters_off(model):
    """The LoRA model computes its base model's function: every adapter's scaling set to 0 for a while.
    This is the reference of a LoRA DPO run, with no second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


class PairBatches:
    """Micro-batches of pair indices, stateless as in sft.py: epoch e is a permutation drawn from (seed, e)
    and global micro-step m takes positions m*B .. m*B+B-1 of the concatenated epochs."""

    def __init__(self, n, batch_size, seed):
        self.n, self.B, self.seed, self._perm = n, batch_size, seed, {}

    def perm(self, epoch):
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, 11, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def get(self, global_micro):
        g = global_micro * self.B
        return [int(self.perm((g + k) // self.n)[(g + k) % self.n]) for k in range(self.B)]


if __name__ == "__main__":
    config_keys = list(config_of(globals()))
    apply_overrides(globals())
    config = {k: globals()[k] for k in config_keys}
    if loss_type not in LOSS_TYPES:
        raise SystemExit(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if reference not in ("model", "cached"):
        raise SystemExit(f"reference must be 'model' or 'cached', not {reference!r}")
    ref_mode = "none" if loss_type in REFERENCE_FREE else reference
    if ref_mode == "model" and lora_rank:
        ref_mode = "adapters_off"

    # ---- set-up -------------------------------------------------------------------------------------------
    ctx = tu.setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir)
    device, device_type, master, accum = ctx["device"], ctx["device_type"], ctx["master"], ctx["accum"]
    dtype, autocast_ctx, scaler = ctx["dtype"], ctx["autocast"], ctx["scaler"]
    lr_decay_iters = lr_decay_iters or max_iters

    # ---- model: the policy, and the reference ------------------------------------------------------------
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    iter_num, best_val_loss, resume_ckpt = 0, float("inf"), None
    if init_from == "resume":
        resume_ckpt = tu.load_checkpoint(ckpt_path, device)
        init_ckpt = resume_ckpt["init_ckpt"]
        iter_num, best_val_loss = resume_ckpt["iter_num"], resume_ckpt["best_val_loss"]
        if "lora" in resume_ckpt:
            lora_rank = resume_ckpt["lora_config"]["rank"]
    elif init_from != "sft":
        raise SystemExit(f"init_from must be 'sft' or 'resume', not {init_from!r}")
    model, model_args, start_state, init = build_finetune_model(
        init_ckpt, resume_ckpt, device, seed, max_seq_len, dropout, lora_rank, lora_alpha, lora_dropout,
        lora_targets)
    # the reference: the starting weights, frozen. 'cached' keeps no copy: the policy itself fills the cache
    # before its first update (only a resumed run without its cache file needs the starting weights again)
    ref_model = frozen_copy(model_args, start_state, device) if ref_mode == "model" else None
    init_state = start_state if ref_mode == "cached" and resume_ckpt is not None else None
    del start_state
    raw_model = model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    tu.restore_or_seed(resume_ckpt, optimizer, scaler, ctx, seed, iter_num)
    tok = tu.load_tokenizer(tokenizer_model or init.get("tokenizer", ""), model_args["vocab_size"])
    pad_id = tok.pad_id if tok.pad_id >= 0 else 0
    if master:
        print(f"{ctx['world_size']} process(es) on {device}, {dtype}; from {init_ckpt}"
              + (f" (resumed at iteration {iter_num})" if resume_ckpt is not None else ""))
        print(f"loss {loss_type}, beta {beta}, reference: {ref_mode}; parameters {raw_model.num_params() / 1e6:.2f}M, "
              f"trainable {n_trainable:,}" + (f" (LoRA rank {lora_rank}, alpha {lora_alpha})" if lora_rank else ""))
    del resume_ckpt

    # ---- data ---------------------------------------------------------------------------------------------
    limit = model_args["max_seq_len"] + 1

    def load(path):
        pairs, counts = load_preferences(path)
        items = [tokenize_pair(tok, p, limit) for p in pairs]
        counts["truncated"] = sum(it[3] for it in items)
        return pairs, [it[:3] for it in items], counts

    train_pairs, train_items, train_counts = load(train_data)
    val_pairs, val_items, val_counts = load(val_data) if val_data else ([], [], {})
    if not train_items:
        raise SystemExit(f"no usable pairs in {train_data}: {dict(train_counts)}")
    batches = PairBatches(len(train_items), batch_size, seed)
    if master:
        print(f"train pairs: {dict(train_counts)}; held-out pairs: {dict(val_counts)}")

    # ---- reference log-probs -------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(x, y, idx, split):
        """(ref_c, ref_r) of a batch, from the reference model, the adapters-off policy or the cache."""
        if ref_mode == "none":
            return None, None
        if ref_mode == "cached":
            c, r = ref_cache[split]
            return c[idx].to(device), r[idx].to(device)
        net = ref_model if ref_mode == "model" else raw_model
        was = net.training
        net.eval()
        with autocast_ctx, (adapters_off(raw_model) if ref_mode == "adapters_off" else nullcontext()):
            c, r, _, _ = concatenated_logps(net, x, y)
        net.train(was)
        return c, r

    ref_cache, cache_seconds = {}, 0.0
    if ref_mode == "cached":
        # the reference log-probs of every pair this run will visit (the sampler is stateless, so they are known
        # in advance) and of the held-out pairs, computed once; NaN marks pairs not computed yet
        cache_path = os.path.join(out_dir, "ref_logps.pt")
        key = {"init_ckpt": init_ckpt, "train": train_data, "val": val_data, "n": [len(train_items), len(val_items)],
               "max_seq_len": model_args["max_seq_len"], "dtype": dtype}
        cached = tu.load_checkpoint(cache_path) if os.path.exists(cache_path) else None
        if cached is not None and cached["key"] == key:
            ref_cache = cached["logps"]
        else:
            ref_cache = {"train": (torch.full((len(train_items),), math.nan), torch.full((len(train_items),), math.nan)),
                         "val": (torch.full((len(val_items),), math.nan), torch.full((len(val_items),), math.nan))}
        visit = {i for g in range(iter_num * gradient_accumulation_steps, max_iters * gradient_accumulation_steps)
                 for i in batches.get(g)}
        todo = {"train": [i for i in sorted(visit) if math.isnan(ref_cache["train"][0][i])],
                "val": [i for i in range(len(val_items)) if math.isnan(ref_cache["val"][0][i])]}
        n_todo = len(todo["train"]) + len(todo["val"])
        if n_todo:
            t = time.time()
            if init_state is None:  # before the first update the policy is the reference
                net, off = raw_model, (lambda: adapters_off(raw_model)) if lora_rank else nullcontext
            else:
                net, off = frozen_copy(model_args, init_state, device), nullcontext
            net.eval()
            for split, items in (("train", train_items), ("val", val_items)):
                c_all, r_all = ref_cache[split]
                for s in range(0, len(todo[split]), batch_size):
                    idx = todo[split][s:s + batch_size]
                    x, y = collate_pairs([items[i] for i in idx], pad_id)
                    with torch.no_grad(), autocast_ctx, off():
                        c, r, _, _ = concatenated_logps(net, x.to(device), y.to(device))
                    c_all[idx], r_all[idx] = c.float().cpu(), r.float().cpu()
            cache_seconds = time.time() - t
            raw_model.train()
            del net
            if master:
                tu.save_checkpoint(cache_path, {"key": key, "logps": ref_cache})
        if master:
            print(f"reference log-probs: {n_todo:,} pairs computed in {cache_seconds:.1f} s, "
                  f"{len(visit) + len(val_items) - n_todo:,} read from {cache_path}")
    init_state = None

    def batch_loss(module, idx, items, split):
        x, y = collate_pairs([items[i] for i in idx], pad_id)
        x, y = x.to(device), y.to(device)
        ref_c, ref_r = reference_logps(x, y, torch.tensor(idx), split)
        with autocast_ctx:
            pol_c, pol_r, n_c, n_r = concatenated_logps(module, x, y)
        loss, rc, rr = preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing,
                                       simpo_gamma, sft_weight)
        return loss, pair_metrics(loss.detach(), pol_c, pol_r, rc, rr), int((x != pad_id).sum())

    @torch.no_grad()
    def evaluate(items, split="val", kinds=None):
        """Mean metrics over all held-out pairs (and accuracy per pair kind when the pairs name one)."""
        was = raw_model.training
        raw_model.eval()
        sums, by_kind = {}, {}
        for s in range(0, len(items), batch_size):
            idx = list(range(s, min(s + batch_size, len(items))))
            x, y = collate_pairs([items[i] for i in idx], pad_id)
            x, y = x.to(device), y.to(device)
            ref_c, ref_r = reference_logps(x, y, torch.tensor(idx), split)
            with autocast_ctx:
                pol_c, pol_r, n_c, n_r = concatenated_logps(raw_model, x, y)
            for k, i in enumerate(idx):  # per pair, so the batch mean weights every pair equally
                loss, rc, rr = preference_loss(loss_type, pol_c[k:k + 1], pol_r[k:k + 1],
                                               None if ref_c is None else ref_c[k:k + 1],
                                               None if ref_r is None else ref_r[k:k + 1], n_c[k:k + 1],
                                               n_r[k:k + 1], beta, label_smoothing, simpo_gamma, sft_weight)
                m = pair_metrics(loss, pol_c[k:k + 1], pol_r[k:k + 1], rc, rr)
                for name, v in m.items():
                    sums[name] = sums.get(name, 0.0) + v
                if kinds is not None and kinds[i]:
                    kk = kinds[i].split("/")[0]
                    acc = by_kind.setdefault(kk, [0, 0])
                    acc[0] += m["logps/accuracy"]
                    acc[1] += 1
        raw_model.train(was)
        out = {k: v / max(len(items), 1) for k, v in sums.items()}
        if by_kind:
            out["logps/accuracy_by_kind"] = {k: a / n for k, (a, n) in sorted(by_kind.items())}
        return out

    module = torch.compile(model) if compile else model
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
    val_kinds = [p.get("kind") for p in val_pairs]
    log = tu.JsonlLog(os.path.join(out_dir, "log.jsonl"), resume=init_from == "resume") if master else None
    first_iter, resumed = iter_num, init_from == "resume"
    start_eval = ev = None
    t_start = t0 = time.time()
    train_time, tokens_seen = 0.0, 0
    while True:
        lr = tu.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out_of_time = max_minutes and (time.time() - t_start) / 60 >= max_minutes
        last = iter_num >= max_iters or out_of_time
        saved = False
        if val_items and (iter_num % eval_interval == 0 or last) and not (resumed and iter_num == first_iter):
            ev = evaluate(val_items, "val", val_kinds)
            if start_eval is None and iter_num == 0:
                start_eval = ev
            val_loss = tu.all_reduce_mean(ev["loss"], ctx)
            tu.check_finite(val_loss, iter_num, out_dir)
            if master:
                print(f"iter {iter_num}: held-out loss {val_loss:.4f}, reward acc {ev['rewards/accuracies']:.3f}, "
                      f"margin {ev['rewards/margins']:.3f}; logp acc {ev['logps/accuracy']:.3f}")
                log.write(iter=iter_num, lr=lr, **{f"val/{k}": v for k, v in ev.items()})
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            if iter_num > first_iter and improved:
                save(ckpt_path)
                saved = True
            t0 = time.time()  # evaluation time is not training time
        if last:
            if iter_num > first_iter and not saved:
                save(ckpt_path)
            break

        sums, n_pairs, n_tok = {}, 0, 0
        for micro in range(accum):
            idx = batches.get(iter_num * gradient_accumulation_steps + ctx["rank"] * accum + micro)
            sync = not ctx["ddp"] or micro == accum - 1
            with (nullcontext() if sync else module.no_sync()):
                loss, m, nt = batch_loss(module, idx, train_items, "train")
                scaler.scale(loss / accum).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n_pairs += len(idx)
            n_tok += nt
        metrics = {k: tu.all_reduce_mean(v / n_pairs, ctx) for k, v in sums.items()}
        if not scaler.is_enabled():
            tu.check_finite(metrics["loss"], iter_num, out_dir)
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        n_tok = int(tu.all_reduce_mean(n_tok, ctx) * ctx["world_size"])
        train_time += dt
        tokens_seen += n_tok
        if master and iter_num % log_interval == 0:
            print(f"iter {iter_num}: loss {metrics['loss']:.4f}, margin {metrics['rewards/margins']:.3f}, "
                  f"acc {metrics['rewards/accuracies']:.2f}, logps c/r {metrics['logps/chosen']:.1f}/"
                  f"{metrics['logps/rejected']:.1f}, lr {lr:.2e}, {dt * 1000:.0f} ms, {n_tok / dt:,.0f} tok/s")
            log.write(iter=iter_num, lr=lr, dt_ms=dt * 1000, tokens_per_sec=n_tok / dt, **metrics)
        iter_num += 1

    # ---- summary, plots, generations before/after --------------------------------------------------------
    if master:
        end_eval = ev
        summary = dict(iter=iter_num, loss_type=loss_type, beta=beta, reference=ref_mode, lora_rank=lora_rank,
                       trainable_params=n_trainable, peak_memory_mb=round(tu.peak_memory_mb(device_type), 1),
                       train_tokens=tokens_seen, train_seconds=round(train_time, 1),
                       tokens_per_sec=round(tokens_seen / max(train_time, 1e-9), 1),
                       reference_cache_seconds=round(cache_seconds, 1),
                       # what the reference costs in memory: a frozen copy of the weights, or the cached numbers
                       reference_mb=round(sum(p.numel() * p.element_size() for p in ref_model.parameters()) / 2 ** 20
                                          if ref_model is not None else
                                          sum(t.numel() * 4 for c in ref_cache.values() for t in c) / 2 ** 20, 2))
        if start_eval is not None and end_eval is not None:
            summary["held_out"] = {
                "pairs": len(val_items),
                "before": {k: start_eval[k] for k in ("logps/accuracy", "logps/margin", "logps/accuracy_by_kind")
                           if k in start_eval},
                "after": {k: end_eval[k] for k in ("logps/accuracy", "logps/margin", "logps/accuracy_by_kind",
                                                   "rewards/accuracies", "rewards/margins") if k in end_eval}}
            print(f"held-out preference accuracy (logp chosen > logp rejected) over {len(val_items)} pairs: "
                  f"before {start_eval['logps/accuracy']:.3f} (mean margin {start_eval['logps/margin']:.2f}) -> "
                  f"after {end_eval['logps/accuracy']:.3f} (mean margin {end_eval['logps/margin']:.2f}); "
                  f"DPO reward accuracy {end_eval['rewards/accuracies']:.3f}, margin {end_eval['rewards/margins']:.3f}")
        log.write(summary=summary)
        log.close()
        tu.plot_log(log.path, os.path.join(out_dir, "loss.png"), (("loss", "train"), ("val/loss", "held-out")),
                    title=f"{loss_type} loss")
        tu.plot_log(log.path, os.path.join(out_dir, "rewards.png"),
                    (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin"),
                     ("val/rewards/margins", "held-out margin")), title="rewards")
        tu.plot_log(log.path, os.path.join(out_dir, "accuracy.png"),
                    (("rewards/accuracies", "reward accuracy"), ("val/rewards/accuracies", "held-out reward acc."),
                     ("val/logps/accuracy", "held-out logp acc.")), title="accuracy")
        print(f"summary: {summary}")

        if n_samples and val_pairs:
            import json
            # one held-out prompt per kind first, then the next ones
            order, seen = [], set()
            for i, p in enumerate(val_pairs):
                if p.get("kind", i) not in seen:
                    seen.add(p.get("kind", i))
                    order.append(i)
            order = (order + [i for i in range(len(val_pairs)) if i not in order])[:n_samples]
            before_model = load_checkpoint_model(init_ckpt, device)[0].eval()
            raw_model.eval()
            samples = []
            for i in order:
                ids = torch.tensor([encode_prompt(tok, val_pairs[i]["prompt"], val_pairs[i].get("system"))], device=device)
                n_new = min(96, model_args["max_seq_len"] - 1)
                gen = lambda m: decode_reply(tok, m.generate(ids[:, -(model_args["max_seq_len"] - n_new):], n_new,
                                                             stop_ids=stop_ids(tok))[0])
                samples.append({"prompt": val_pairs[i]["prompt"][-1]["content"], "chosen": val_pairs[i]["chosen"],
                                "before": gen(before_model), "after": gen(raw_model)})
                print(f"--- {samples[-1]['prompt']}\n  before: {samples[-1]['before']!r}\n  after:  {samples[-1]['after']!r}")
            with open(os.path.join(out_dir, "samples.json"), "w", encoding="utf-8") as f:
                json.dump(samples, f, ensure_ascii=False, indent=1)
        if lora_rank and save_merged:
            merge_lora(raw_model)
            tu.save_checkpoint(os.path.join(out_dir, "merged.pt"), {
                "model": raw_model.state_dict(), "model_args": model_args, "iter_num": iter_num, "config": config,
                "tokenizer": tok.model_path, "tokenizer_sha256": tok.sha256(), "init_ckpt": init_ckpt})
        print(f"done: {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}")
    tu.cleanup_ddp(ctx)
