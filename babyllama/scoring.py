"""The model-facing half of eval.py: log-probabilities of chosen next tokens for batches of prompts (one KV cache for a
prefix many prompts share), multiple-choice scoring by answer letter and by option text, and the token loss of long
sequences with a sliding window (perplexity, bits per character). Right padding needs no mask: a causal model's logits
at real positions never see the pad after them."""
from contextlib import nullcontext
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from babyllama.generate import right_pad
from babyllama.mc import LETTERS, encode_pieces, fit_prompt, letter_ids, shots_for

MIN_PREFIX = 32  # shorter shared prefixes are recomputed per prompt: the copy costs as much


# ---- log-probabilities of chosen tokens -----------------------------------------------------------------

@torch.inference_mode()
def forward_rows(model, rows, device, kv=None, P=0, starts=None, M=0, mids=None):
    """Final hidden states (B, S, D) of right-padded rows (B lists of ids) continuing context held in a KV cache, and
    the caches with the rows' keys and values written after it. kv: None, or per layer (k, v), each (1 or B, n_kv_heads,
    P + M, hd): columns [0, P) a prefix all rows share, of which row b reads the first starts[b] (default P); columns
    [P, P + M) each row's own middle part, of which row b reads the first mids[b] (default 0). Row b's tokens sit at
    positions starts[b] + mids[b] + t; unread keys are masked. Real tokens' positions must be < max_seq_len (a padding
    slot past the context takes the last one)."""
    x, _ = right_pad(rows, device)
    B, S = x.shape
    starts = torch.tensor(starts if starts is not None else [P] * B, device=device)
    mids = torch.tensor(mids if mids is not None else [0] * B, device=device)
    steps = torch.arange(S, device=device)
    pos = (starts[:, None] + mids[:, None] + steps[None, :]).clamp(max=model.args.max_seq_len - 1)
    n_kv = model.layers[0].attention.n_kv_heads
    hd = model.args.dim // model.args.n_heads
    dtype = model.tok_embeddings.weight.dtype
    caches = [(torch.empty(B, n_kv, P + M + S, hd, device=device, dtype=dtype),
               torch.empty(B, n_kv, P + M + S, hd, device=device, dtype=dtype)) for _ in model.layers]
    mask = None  # no context: causal
    if kv is not None:
        for (ck, cv), (k, v) in zip(caches, kv):  # every row gets its own copy of the context, then its keys
            ck[:, :, :P + M], cv[:, :, :P + M] = k, v
        c = torch.arange(P + M + S, device=device)[None, None, :]
        b_start, b_mid, t = starts[:, None, None], mids[:, None, None], steps[None, :, None]
        mask = ((c < b_start) | ((c >= P) & (c < P + b_mid)) | ((c >= P + M) & (c - P - M <= t)))[:, None]
    return model._forward_positions(x, pos, mask, caches, P + M, head=False), caches


def logprobs_at(model, h, targets):
    """log P(token) from hidden states h (B, S, D) at (b, t, token) triples: a list of floats (fp32)."""
    where = sorted({(b, t) for b, t, _ in targets})
    index = {bt: i for i, bt in enumerate(where)}
    hs = h[torch.tensor([b for b, _ in where]), torch.tensor([t for _, t in where])]
    logp = model.output(hs).float().log_softmax(-1)
    rows_i = torch.tensor([index[(b, t)] for b, t, _ in targets], device=logp.device)
    tok_i = torch.tensor([tok for _, _, tok in targets], device=logp.device)
    return logp[rows_i, tok_i].tolist()


@torch.inference_mode()
def prefix_kv(model, prefix, device):
    """The keys and values of a prefix (list of ids, batch 1): per layer (k, v), each (1, n_kv_heads, P, hd)."""
    return forward_rows(model, [prefix], device)[1]


@torch.inference_mode()
def token_logprobs(model, rows, targets, device, prefix_len=0, kv=None, row_prefix=None):
    """log P(token | everything before it), nats (fp32 log-softmax), for chosen (b, t, token) targets of a batch: the
    log-probability that rows[b][t] is followed by token, in the order of targets. With kv (prefix_kv of prefix_len
    tokens) row b continues the first row_prefix[b] tokens of that prefix (default all)."""
    h, _ = forward_rows(model, rows, device, kv, prefix_len, row_prefix)
    return logprobs_at(model, h, targets)


def prefix_groups(units, use_prefix_cache):
    """{cached prefix (tuple, () = none): units}. Prefixes of >= MIN_PREFIX tokens are cached, each in the group of a
    longer one it starts (a prompt that dropped shots reads its subject's full prefix): one cache per subject."""
    groups = {(): []}
    if not use_prefix_cache:
        groups[()] = list(units)
        return groups
    for key in sorted({tuple(u["prefix"]) for u in units if len(u["prefix"]) >= MIN_PREFIX}, key=len, reverse=True):
        if not any(g[:len(key)] == key for g in groups if len(g) > len(key)):
            groups[key] = []
    for u in units:
        p = tuple(u["prefix"])
        if len(p) < MIN_PREFIX:
            groups[()].append(u)
        else:
            groups[next(g for g in groups if len(g) >= len(p) and g[:len(p)] == p)].append(u)
    return groups


def progress(desc, total, unit):
    """A tqdm bar (refreshing every 30 s when stderr is not a terminal), or None without desc."""
    if not desc:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)


def score_batches(model, units, batch_size, device, use_prefix_cache=True, on_batch=None):
    """Fill in the "logprobs" of scoring units, batch_size rows at a time. A unit: "prefix" (ids), optional "shared"
    (ids every row starts with: the question, when the rows are its options), "rows" (lists of ids), "targets": (row, t,
    token) triples, t indexing shared + row; logprobs come out in the order of targets. With use_prefix_cache a prefix
    of >= MIN_PREFIX tokens runs as one KV cache (prefix_groups) and a shared part is computed once for its rows;
    without, every row is sent whole. on_batch(n_rows) is called after each batch."""
    for prefix, group in prefix_groups(units, use_prefix_cache).items():
        if not group:
            continue
        kv = prefix_kv(model, list(prefix), device) if prefix else None
        P = len(prefix)
        plain = [u for u in group if not (use_prefix_cache and u.get("shared"))]
        two_level = [u for u in group if use_prefix_cache and u.get("shared")]
        rows = []  # (unit, ids, [(t, token, index of the unit's target)], prefix read)
        for u in plain:
            u["logprobs"] = [None] * len(u["targets"])
            lead = ([] if prefix else u["prefix"]) + u.get("shared", [])
            for r, row in enumerate(u["rows"]):
                tg = [(len(lead) - len(u.get("shared", [])) + t, tok, i)
                      for i, (rr, t, tok) in enumerate(u["targets"]) if rr == r]
                rows.append((u, lead + row, tg, P and len(u["prefix"])))
        rows.sort(key=lambda x: len(x[1]))  # similar lengths together: less padding
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            targets = [(b, t, tok) for b, (_, _, tg, _) in enumerate(chunk) for t, tok, _ in tg]
            out = iter(token_logprobs(model, [ids for _, ids, _, _ in chunk], targets, device, P, kv,
                                      [p for *_, p in chunk]))
            for u, _, tg, _ in chunk:
                for _, _, idx in tg:
                    u["logprobs"][idx] = next(out)
            if on_batch:
                on_batch(len(chunk))
        two_level.sort(key=lambda u: len(u["shared"]))
        i = 0
        while i < len(two_level):  # as many units as have batch_size rows between them (at least one)
            chunk, n = [], 0
            while i < len(two_level) and (not chunk or n + len(two_level[i]["rows"]) <= batch_size):
                chunk.append(two_level[i])
                n += len(two_level[i]["rows"])
                i += 1
            score_shared(model, chunk, device, kv, P)
            if on_batch:
                on_batch(n)


def score_shared(model, units, device, kv, P):
    """Two-level scoring: the units' shared parts go through the model once (as a batch, reading the prefix cache kv of
    P tokens), then each unit's rows read its shared part's keys and values. A target right after the shared part (an
    option's first token) is read from the first pass."""
    lead = [[] if kv is not None else u["prefix"] for u in units]
    starts = [len(u["prefix"]) if kv is not None else 0 for u in units]
    shared = [ld + u["shared"] for ld, u in zip(lead, units)]
    h1, caches = forward_rows(model, shared, device, kv, P, starts)
    M = max(len(s) for s in shared)
    first, later = [], []  # targets of the first pass (b, t, tok) and of the second (row, t, tok)
    row_units, row_mid = [], []
    for b, (u, ld) in enumerate(zip(units, lead)):
        u["logprobs"] = [None] * len(u["targets"])
        base = len(row_units)
        row_units += [b] * len(u["rows"])
        row_mid += [len(shared[b])] * len(u["rows"])
        for i, (r, t, tok) in enumerate(u["targets"]):
            if t < len(u["shared"]):
                first.append((b, len(ld) + t, tok, u, i))
            else:
                later.append((base + r, t - len(u["shared"]), tok, u, i))
    for (_, _, _, u, i), lp in zip(first, logprobs_at(model, h1, [(b, t, tok) for b, t, tok, _, _ in first])):
        u["logprobs"][i] = lp
    if later:
        pick = torch.tensor(row_units, device=device)
        kv2 = [(k[:, :, :P + M].index_select(0, pick), v[:, :, :P + M].index_select(0, pick)) for k, v in caches]
        rows = [u["rows"][r] for u in units for r in range(len(u["rows"]))]
        h2, _ = forward_rows(model, rows, device, kv2, P, [starts[b] for b in row_units], M, row_mid)
        for (_, _, _, u, i), lp in zip(later, logprobs_at(model, h2, [(b, t, tok) for b, t, tok, _, _ in later])):
            u["logprobs"][i] = lp


# ---- multiple choice ------------------------------------------------------------------------------------

def mc_units(tok, exam, names, chat, k_shot, max_seq_len, scorings):
    """The scoring units of every question (see score_batches) and the prompt statistics. "letter": one row, the prompt,
    targets the first token of A, B, C, D after the cue. "option": the cloze prompt (no options listed) shared by four
    rows, the options' texts, targets their tokens. A prompt too long drops shots, then keeps its last tokens
    (mc.fit_prompt), leaving room for the longest option. Returns (units, stats), stats[scoring] = counts of prompts
    with fewer shots than asked and of truncated prompts."""
    letters = letter_ids(tok)
    units, stats = [], {s: {"fewer_shots": 0, "truncated": 0} for s in scorings}
    for subject, part in exam.items():
        name = names.get(subject, {}).get("name", subject)
        for scoring in scorings:
            cloze = scoring == "option"
            pieces = {}  # the subject's shots, encoded once
            for qi, q in enumerate(part["questions"]):
                opts = [tok.encode(o) for o in q["options"]] if cloze else None
                shots = shots_for(q, part["shots"], k_shot)
                for s in shots:
                    if id(s) not in pieces:
                        pieces[id(s)] = encode_pieces(tok, name, [s], s, chat, cloze)[1][0]
                head, _, question = encode_pieces(tok, name, [], q, chat, cloze)
                room = min(max(len(o) for o in opts), max_seq_len // 2) if cloze else 0
                prefix, suffix, n_shots, truncated = fit_prompt(head, [pieces[id(s)] for s in shots], question,
                                                                max_seq_len - room)
                stats[scoring]["fewer_shots"] += n_shots < k_shot
                stats[scoring]["truncated"] += truncated
                u = {"subject": subject, "q": qi, "scoring": scoring, "prefix": prefix, "shots": n_shots}
                if scoring == "letter":
                    u["rows"] = [suffix]
                    u["targets"] = [(0, len(suffix) - 1, L) for L in letters]
                else:
                    opts_fit = [o[:room] for o in opts]
                    u["shared"], u["rows"] = suffix, opts_fit  # the question once, then its four options
                    u["targets"] = [(j, len(suffix) - 1 + i, o[i]) for j, o in enumerate(opts_fit)
                                    for i in range(len(o))]
                    u["n_chars"] = [len(o) if len(f) == len(ids) else len(tok.decode(f))  # a cut option: its part
                                    for o, ids, f in zip(q["options"], opts, opts_fit)]
                units.append(u)
    return units, stats


def mc_choice(unit):
    """(index of the chosen option, its four scores): the letters' log-probabilities, or the options' summed
    log-probabilities per character (long options not penalised; lm-evaluation-harness's acc_norm divides by bytes)."""
    if unit["scoring"] == "letter":
        scores = unit["logprobs"]
    else:
        sums = [0.0] * 4
        for (j, _, _), lp in zip(unit["targets"], unit["logprobs"]):
            sums[j] += lp
        scores = [s / max(n, 1) for s, n in zip(sums, unit["n_chars"])]
    return max(range(4), key=lambda j: scores[j]), scores


def score_mc(model, tok, exam, names, chat, k_shot, scorings, batch_size, device, autocast_ctx=nullcontext(),
             use_prefix_cache=True, desc=None):
    """Score every question of exam (mc.load_exam) by each scoring ("letter", "option"); batch_size counts rows (a
    question is one by letter, four by option); desc: the progress bar's label (None = no bar). Returns (correct,
    predictions, stats): correct[scoring][subject] = [bool per question]; predictions a dict per (question, scoring)."""
    units, stats = mc_units(tok, exam, names, chat, k_shot, model.args.max_seq_len, scorings)
    bar = progress(desc, sum(len(u["rows"]) for u in units), "prompt")
    with autocast_ctx:
        score_batches(model, units, batch_size, device, use_prefix_cache, bar.update if bar else None)
    if bar:
        bar.close()
    correct = {s: {subject: [None] * len(part["questions"]) for subject, part in exam.items()} for s in scorings}
    predictions = []
    for u in units:
        j, scores = mc_choice(u)
        q = exam[u["subject"]]["questions"][u["q"]]
        correct[u["scoring"]][u["subject"]][u["q"]] = LETTERS[j] == q["answer"]
        predictions.append({"subject": u["subject"], "id": q["id"], "scoring": u["scoring"], "answer": q["answer"],
                            "prediction": LETTERS[j], "scores": [round(s, 4) for s in scores], "shots": u["shots"]})
    return correct, predictions, stats


# ---- perplexity -----------------------------------------------------------------------------------------

def sliding_windows(n, max_seq_len, stride):
    """Windows over n tokens predicting tokens 1..n-1 once each: (start, length, skip) reads tokens[start:start+length]
    and scores all but its first `skip` predictions (an earlier window's). After the first window each scored token has
    >= max_seq_len - stride tokens of context. ValueError unless 1 <= stride <= max_seq_len."""
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in [1, max_seq_len={max_seq_len}], not {stride}")
    out, done, start = [], 0, 0  # done: the last target index already scored
    while done < n - 1:
        length = min(max_seq_len, n - 1 - start)
        out.append((start, length, done - start))
        done = start + length
        start += stride
    return out


@torch.inference_mode()
def sequence_loss(model, seqs, stride, batch_size, device, autocast_ctx=nullcontext(), desc=None):
    """Summed next-token loss (nats) and the count of scored tokens over sequences of ids (lists or int arrays), each
    token after a sequence's first scored once (sliding_windows); desc: the progress bar's label (None = no bar)."""
    T = model.args.max_seq_len
    rows = [(seq, s, n, skip) for seq in seqs for s, n, skip in sliding_windows(len(seq), T, stride)]
    rows.sort(key=lambda r: r[2])  # similar lengths together: less padding
    bar = progress(desc, len(rows), "window")
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        L = max(n for _, _, n, _ in chunk)
        x = torch.zeros((len(chunk), L), dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)
        for b, (seq, s, n, skip) in enumerate(chunk):
            window = torch.as_tensor(seq[s:s + n + 1], dtype=torch.long)
            x[b, :n] = window[:-1]
            y[b, skip:n] = window[1 + skip:]
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            h = model._forward_positions(x, torch.arange(L, device=device).expand(len(chunk), L), None, head=False)
            scored = y >= 0
            hs, ys = h[scored], y[scored]  # only the scored positions go through the output layer
            for j in range(0, len(ys), 4096):  # a few thousand rows of vocab_size logits at a time
                logits = model.output(hs[j:j + 4096]).float()
                total += F.cross_entropy(logits, ys[j:j + 4096], reduction="sum").item()
        count += len(ys)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return total, count


def bits_per_character(total_nats, n_chars):
    """Bits per character: the summed loss in nats over the characters it covers, in bits."""
    return total_nats / (n_chars * math.log(2))
