"""
Evaluate a checkpoint: continuation samples for a list of prompts, and validation loss / perplexity on a
token file.

    python eval.py --ckpt_path=out/pretrain/ckpt.pt
    python eval.py --prompts="['春眠不觉晓，']" --temperature=0.0 --stream=True
    python eval.py --mode=loss --val_data=out/data/poetry/val.bin
    python eval.py --mode=chat --ckpt_path=out/sft/ckpt.pt                  # interactive: /reset, /quit
    python eval.py --mode=chat --ckpt_path=out/sft/ckpt.pt --questions_file=q.jsonl --answers_file=a.jsonl

Chat mode uses the chat template (tokenizer/chat_template.py), streams the reply token by token through the
KV-cached generate_stream and stops on <|end|>. A LoRA checkpoint from sft.py is loaded as base + adapter,
merged. Batch chat: questions_file is .txt (one question per line) or .jsonl ({"question", optional
"system", "reference", "kind"}); answers go to answers_file as JSONL, and when references are given the
exact-match rate is printed per kind (for kind "poem", also the rate of well-formed 5/7-character poems).
"""
import math
import os
import sys
import time

import numpy as np
import torch

import checkpoint as ck
from clean_data.atomic import write_json, write_jsonl
from clean_data.readers import ReadErrors, iter_records, read_txt
from chat_data.poetry import well_formed_poem
from configurator import apply_overrides
from tokenizer import StreamDecoder, Tokenizer
from tokenizer.chat_template import decode_reply, encode_prompt, stop_ids
import train_utils as tu

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in the checkpoint
mode = "sample"  # 'sample', 'loss', 'all' (sample + loss), 'chat' (interactive, or batch with questions_file)
prompts = ["床前明月光，疑是地上霜。举头望明月，", "白日依山尽，", "春眠不觉晓，", "明月几时有？"]
prompt_file = ""  # one prompt per line; replaces `prompts`
max_new_tokens = 64
temperature = 0.8  # 0 = greedy
top_k = 50  # 0 = off
top_p = 0.95  # 1.0 = off
repetition_penalty = 1.1  # 1.0 = off
num_samples = 1
stream = False  # print tokens as they come (prompts one by one)
val_data = ""  # token file for loss/perplexity; "" = val.bin of the data the checkpoint was trained on
val_max_tokens = 200_000  # evaluate at most this many tokens, in consecutive non-overlapping windows
batch_size = 8
seed = 1337
compile = False  # compile the decode step: pays off for long or many generations
system_prompt = ""  # chat: an optional system prompt
questions_file = ""  # chat: batch mode, questions in (.txt or .jsonl); "" = interactive
answers_file = ""  # chat batch mode: JSONL answers out ("" = questions_file + .answers.jsonl)
results_file = ""  # JSON out: what this run measured (samples, loss, chat scores); "" = none
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------------------------------------


def sample(model, tok, prompt_list, device, autocast_ctx):
    """Continue each prompt; all prompts go through generate() together as one padded batch."""
    # every training document follows an eos, so starting a prompt with eos puts the model at a document start
    encoded = [[tok.eos_id] + tok.encode(p) for p in prompt_list]
    lens = [len(e) for e in encoded]
    idx = torch.zeros((len(encoded), max(lens)), dtype=torch.long)
    for i, e in enumerate(encoded):
        idx[i, :len(e)] = torch.tensor(e)
    opts = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                repetition_penalty=repetition_penalty, stop_ids=[tok.eos_id])
    results = []
    for s in range(num_samples):
        if stream:
            for p, e in zip(prompt_list, encoded):
                print(p, end="", flush=True)
                dec = StreamDecoder(tok)
                with autocast_ctx:
                    for t in model.generate_stream(torch.tensor(e, device=device), max_new_tokens, **opts):
                        if t != tok.eos_id:
                            print(dec.put(t), end="", flush=True)
                print(dec.flush(), flush=True)
            continue
        t0 = time.time()
        with autocast_ctx:
            outs = model.generate(idx.to(device), max_new_tokens, prompt_lens=lens, **opts)
        dt = time.time() - t0
        n_new = sum(len(o) for o in outs)
        for p, o in zip(prompt_list, outs):
            text = tok.decode([t for t in o if t != tok.eos_id])
            print(f"--- {p}{text}")
            results.append({"prompt": p, "completion": text})
        print(f"(sample {s + 1}/{num_samples}: {n_new} tokens in {dt:.2f}s, {n_new / dt:.1f} tok/s)")
    return results


@torch.no_grad()
def val_loss(model, path, device, autocast_ctx):
    """Mean next-token loss (nats) over consecutive windows of a uint16 token file (every token scored once),
    and how many tokens that is. The file is checked as training checks it (train_utils.open_bins)."""
    if not path.endswith(".bin"):
        raise SystemExit(f"{path}: --mode=loss reads a token file (.bin from data_process.py), not {path!r}")
    T = model.args.max_seq_len
    bins, paths, _ = tu.open_bins(path, model.args.vocab_size, like=tokenizer_of_model, min_tokens=T + 1)
    if len(bins) > 1:
        raise SystemExit(f"--mode=loss evaluates one token file; {path!r} is {len(paths)}: {', '.join(paths)}")
    data = bins[0]
    n_windows = min((len(data) - 1) // T, max(1, val_max_tokens // T))
    if n_windows < 1:
        raise SystemExit(f"{path}: {len(data)} tokens, fewer than one window of {T + 1}")
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = [data[w * T:w * T + T + 1].astype(np.int64) for w in range(start, min(n_windows, start + batch_size))]
        xy = torch.from_numpy(np.stack(rows)).to(device)
        with autocast_ctx:
            _, loss = model(xy[:, :-1], xy[:, 1:], return_logits=False)  # no B x T x V logits held
        total += loss.item() * len(rows) * T
        count += len(rows) * T
    return total / count, count


def _gen_opts(tok):
    return dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                repetition_penalty=repetition_penalty, stop_ids=stop_ids(tok))


def fit_history(tok, history, max_prompt_tokens, system=None):
    """The chat prompt, dropping the oldest exchanges until it fits max_prompt_tokens tokens."""
    while True:
        prompt = encode_prompt(tok, history, system or None)
        if len(prompt) <= max_prompt_tokens or len(history) <= 1:
            return prompt[-max_prompt_tokens:], history
        history = history[2:]


def chat_interactive(model, tok, device, autocast_ctx):
    print("chat: type a message; /reset clears the conversation, /quit leaves")
    history, stops = [], set(stop_ids(tok))
    while True:
        try:
            line = input("用户> ")
        except EOFError:
            break
        except UnicodeDecodeError:  # bytes the terminal's encoding cannot read: say so and go on
            print("(that line was not valid text in the terminal's encoding; type it again)")
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        prompt, history = fit_history(tok, history + [{"role": "user", "content": line}],
                                      model.args.max_seq_len - max_new_tokens, system_prompt)
        dec, reply = StreamDecoder(tok), []
        print("助手> ", end="", flush=True)
        with autocast_ctx:
            for t in model.generate_stream(torch.tensor(prompt, device=device), max_new_tokens, **_gen_opts(tok)):
                if t in stops:
                    break
                reply.append(t)
                print(dec.put(t), end="", flush=True)
        print(dec.flush(), flush=True)
        history.append({"role": "assistant", "content": tok.decode(reply)})


def read_questions(path):
    """The questions of a .txt file (one per line) or a .jsonl file ({"question", optional "system",
    "reference", "kind"}). Lines that are not UTF-8, not JSON, or have no "question" string are skipped, counted
    and named (file:line); no question at all is an error naming the file."""
    errors = ReadErrors()
    if path.endswith(".jsonl"):
        items = []
        for line, rec in iter_records(path, errors):
            if isinstance(rec, dict) and isinstance(rec.get("question"), str) and rec["question"].strip():
                items.append(rec)
            else:
                errors.add(path, line, "no question", 'want {"question": "..."}')
    else:
        items = [{"question": d["text"]} for d in read_txt(path, path, errors)]
    if errors.count:
        print(errors.report())
    if not items:
        raise SystemExit(f"{path}: no question to answer ({errors.count} lines skipped)")
    return items


def chat_batch(model, tok, device, autocast_ctx, path, out_path):
    """Answer every question of the file in padded batches; JSONL out; exact match etc. when references."""
    items = read_questions(path)
    max_prompt_tokens = model.args.max_seq_len - max_new_tokens
    stops = set(stop_ids(tok))
    t0, n_new = time.time(), 0
    from tqdm import tqdm
    bar = tqdm(total=len(items), desc="chat", unit="answer", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [fit_history(tok, [{"role": "user", "content": it["question"]}], max_prompt_tokens,
                               it.get("system") or system_prompt)[0] for it in chunk]
        lens = [len(p) for p in prompts]
        idx = torch.zeros((len(prompts), max(lens)), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p)
        with autocast_ctx:
            outs = model.generate(idx.to(device), max_new_tokens, prompt_lens=lens, **_gen_opts(tok))
        for it, o in zip(chunk, outs):
            n_new += len(o)
            it["answer"] = decode_reply(tok, o)
            it["finished"] = bool(o) and o[-1] in stops
        bar.update(len(chunk))
    bar.close()
    dt = time.time() - t0
    write_jsonl(out_path, items)
    print(f"{len(items)} answers in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} tok/s) -> {out_path}")
    scores = {}
    for kind in sorted({it.get("kind", "") for it in items if "reference" in it}):
        group = [it for it in items if "reference" in it and it.get("kind", "") == kind]
        s = {"n": len(group), "exact_match": sum(it["answer"] == it["reference"] for it in group) / len(group),
             "finished": sum(it["finished"] for it in group) / len(group)}
        if kind == "poem":
            s["well_formed"] = sum(it["finished"] and well_formed_poem(it["answer"]) for it in group) / len(group)
        if kind == "author":  # the right name anywhere in the reply
            s["author_named"] = sum(bool(it.get("author")) and it["author"] in it["answer"] for it in group) / len(group)
        scores[kind or "all"] = s
        print(f"{kind or 'all'}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in s.items()))
    for it in items[:6]:
        print(f"Q: {it['question']}\nA: {it['answer']}")
    return scores


MODES = ("sample", "loss", "all", "chat")

if __name__ == "__main__":
    apply_overrides(globals())
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        tu.configure_cpu()
    autocast_ctx, _ = tu.amp_setup(device_type, tu.resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    model, ckpt = ck.load_model(ckpt_path, device)  # any checkpoint: full, or base + LoRA adapter merged
    model.eval()
    if compile:
        model.compile_decode()
    print(f"loaded {ckpt_path}: iteration {ckpt['iter_num']}, {model.num_params() / 1e6:.2f}M parameters")
    tok = Tokenizer(tokenizer_model or ckpt.get("tokenizer") or "")
    if ckpt.get("tokenizer_sha256") and tok.sha256() != ckpt["tokenizer_sha256"]:
        raise SystemExit(f"{tok.model_path} is not the tokenizer the model was trained with (sha256 differs from "
                         f"the checkpoint's {ckpt['tokenizer_sha256'][:12]}...): its text would be garbage")
    tokenizer_of_model = {"tokenizer_sha256": ckpt.get("tokenizer_sha256")}  # token files must match it
    if tok.vocab_size != model.args.vocab_size:
        raise SystemExit(f"tokenizer {tok.model_path} has {tok.vocab_size} tokens, the model {model.args.vocab_size}")
    results = {}  # what results_file gets
    if mode == "chat":
        if questions_file:
            results["chat_scores"] = chat_batch(model, tok, device, autocast_ctx, questions_file,
                                                answers_file or questions_file + ".answers.jsonl")
        else:
            chat_interactive(model, tok, device, autocast_ctx)
    if mode in ("sample", "all"):
        if prompt_file:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        results["samples"] = sample(model, tok, prompts, device, autocast_ctx)
    if mode in ("loss", "all"):
        path = val_data or ckpt["config"].get("val_data", "")
        if not path or not os.path.exists(path):
            sys.exit(f"no validation file: pass --val_data (tried {path!r})")
        loss, n = val_loss(model, path, device, autocast_ctx)
        results.update(val_loss=loss, perplexity=math.exp(loss), val_tokens=n, val_data=path)
        # pretrain.py's "val loss" is an estimate on eval_iters batches of random windows: this one reads the
        # file in order, every token once, so the two differ by sampling noise (a few hundredths)
        print(f"val loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({n:,} tokens of {path}, every token once in "
              f"consecutive windows of {model.args.max_seq_len})")
    if results_file:
        write_json(results_file, dict(ckpt_path=ckpt_path, iter=ckpt["iter_num"], mode=mode, **results))
        print(f"results -> {results_file}")
