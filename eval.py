"""
Measure a checkpoint. One script, one mode per kind of measurement; every mode shows a progress bar, writes a JSON
result file (--results_file; by default beside the checkpoint) and prints a markdown table.

    python eval.py --ckpt_path=out/pretrain/ckpt.pt                          # continuations of a few prompts
    python eval.py --mode=ppl --val_data=out/data/poetry/val.bin             # loss, perplexity, bits per char
    python eval.py --mode=ppl --val_data=some.txt                            # ... on raw text (.txt/.jsonl/.parquet)
    python eval.py --mode=mc --mc_data=../shared/data/ceval --split=val --k_shot=5     # C-Eval / CMMLU tables
    python eval.py --mode=mc --mc_data=out/demo/poetry_bench                 # the poetry benchmark (poetry_bench.py)
    python eval.py --mode=gen --gen_file=qa.jsonl                            # BLEU-1..4, ROUGE-L against references
    python eval.py --mode=chat --ckpt_path=out/sft/ckpt.pt                  # interactive: /reset, /quit
    python eval.py --mode=chat --ckpt_path=out/sft/ckpt.pt --questions_file=q.jsonl --answers_file=a.jsonl

ppl: every token after a document's start is scored once; a document longer than the context is read in windows
  that advance by `stride` tokens, so each scored token sees at least max_seq_len - stride tokens before it.
  Raw text: each document is eos + its tokens + eos, as data_process.py writes it. Bits per character =
  summed loss / (characters x ln 2), comparable across tokenizers (characters: of the text; for a .bin file, of
  its decoded documents).
mc: C-Eval / CMMLU layouts (babyllama/mc.py), 0- or k-shot, plain prompt (base model) or chat template (SFT/DPO
  checkpoints), scored by the letter's next-token likelihood after "答案：" and by each option text's
  log-likelihood per character (babyllama/scoring.py).
gen: JSONL {"prompt" | "messages", "reference"} (babyllama/qa_files.py); answers in batches (babyllama/answering.py),
  scored by babyllama/text_metrics.py; per-sample JSONL.

Chat mode uses the chat template (tokenizer/chat_template.py), streams the reply token by token through the
KV-cached generate_stream and stops on <|end|>. A LoRA checkpoint from sft.py is loaded as base + adapter,
merged. Batch chat: questions_file is .txt (one question per line) or .jsonl ({"question", optional
"system", "reference", "kind"}); answers go to answers_file as JSONL, and when references are given the
exact-match rate is printed per kind (for kind "poem", also the rate of well-formed 5/7-character poems:
babyllama/poem_form.py). Every mode that needs a model loads it through babyllama/inference.py.
"""
import math
import os
import sys
import time

import torch

from babyllama import text_metrics
from babyllama.answering import answer_scores, fit_history, generate_replies
from babyllama.atomic import write_json, write_jsonl
from babyllama.configurator import apply_overrides
from babyllama.generate import compile_decode, generate, generate_stream, right_pad
from babyllama.inference import load_for_inference
from babyllama.int8 import quantize_model
from babyllama.mc import MCError, flagged_keys, guess_benchmark, load_exam, load_subjects, results_tables, summarize
from babyllama.ppl_data import ppl_bin, ppl_text
from babyllama.qa_files import read_gen_items, read_questions
from babyllama.scoring import bits_per_character, score_mc, sequence_loss
from tokenizer import StreamDecoder
from tokenizer.chat_template import decode_reply, stop_ids

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in the checkpoint
mode = "sample"  # sample, ppl (or loss), all (sample + ppl), chat, mc, gen
prompts = ["床前明月光，疑是地上霜。举头望明月，", "白日依山尽，", "春眠不觉晓，", "明月几时有？"]
prompt_file = ""  # one prompt per line; replaces `prompts`
max_new_tokens = 64
temperature = 0.8  # 0 = greedy
top_k = 50  # 0 = off
top_p = 0.95  # 1.0 = off
repetition_penalty = 1.1  # 1.0 = off
num_samples = 1
stream = False  # print tokens as they come (prompts one by one)
val_data = ""  # ppl: a token file (.bin) or raw text (.txt/.jsonl/.parquet); "" = the checkpoint's val.bin
val_max_tokens = 200_000  # ppl on a .bin: at most this many tokens (from the start; 0 = all)
batch_size = 8
seed = 1337
compile = False  # compile the decode step: pays off for long or many generations
quantize = ""  # 'int8': weight-only int8 linear layers (babyllama/int8.py), a quarter of their fp32 memory
system_prompt = ""  # chat: an optional system prompt
questions_file = ""  # chat: batch mode, questions in (.txt or .jsonl); "" = interactive
answers_file = ""  # chat batch mode: JSONL answers out ("" = questions_file + .answers.jsonl)
results_file = ""  # JSON out: what this run measured; "" = none for sample/chat, beside the checkpoint otherwise
device = "auto"
dtype = "auto"
# ppl
stride = 0  # sliding-window step in tokens; 0 = max_seq_len // 2
text_field = ""  # ppl on .jsonl/.parquet: the field with the text ("" = auto)
max_docs = 0  # ppl on raw text: at most this many documents (0 = all)
# mc
mc_data = ""  # folder of a multiple-choice set in the C-Eval or CMMLU layout (babyllama/mc.py)
split = "val"  # the split scored
shots_split = "dev"  # where k-shot examples come from (same subject)
k_shot = 0
subjects = ""  # comma-separated subset ("" = all)
benchmark = ""  # 'ceval', 'cmmlu' (subject names and categories) or anything else; "" = from mc_data's name
scoring = "letter,option"  # letter: next-token likelihood of A-D after the cue; option: per-character option LL
prompt_format = "auto"  # 'plain', 'chat'; auto = chat for SFT/DPO checkpoints, plain for pretrained ones
prefix_cache = True  # compute a prefix shared by a subject's prompts (instruction + shots) once, as a KV cache
contamination_file = ""  # mc, chat: JSON from contamination.py; flagged items counted (mc), scored apart (chat)
# gen
gen_file = ""  # JSONL {"prompt" | "messages", "reference"}
# -----------------------------------------------------------------------------------------------------------


def sample(model, tok, prompts, sampling, max_new_tokens, num_samples, stream, device, autocast_ctx):
    """Continue each prompt num_samples times; all prompts go through generate() together as one padded batch
    (stream: one by one, printing tokens as they come). sampling: generate()'s temperature, top_k, top_p and
    repetition_penalty. Returns [{"prompt", "completion"}] (none when streamed)."""
    # every training document follows an eos, so starting a prompt with eos puts the model at a document start
    encoded = [[tok.eos_id] + tok.encode(p) for p in prompts]
    idx, lens = right_pad(encoded)
    opts = dict(sampling, stop_ids=[tok.eos_id])
    results = []
    for s in range(num_samples):
        if stream:
            for p, e in zip(prompts, encoded):
                print(p, end="", flush=True)
                dec = StreamDecoder(tok)
                with autocast_ctx:
                    for t in generate_stream(model, torch.tensor(e, device=device), max_new_tokens, **opts):
                        if t != tok.eos_id:
                            print(dec.put(t), end="", flush=True)
                print(dec.flush(), flush=True)
            continue
        t0 = time.time()
        with autocast_ctx:
            outs = generate(model, idx.to(device), max_new_tokens, prompt_lens=lens, **opts)
        dt = time.time() - t0
        n_new = sum(len(o) for o in outs)
        for p, o in zip(prompts, outs):
            text = tok.decode([t for t in o if t != tok.eos_id])
            print(f"--- {p}{text}")
            results.append({"prompt": p, "completion": text})
        print(f"(sample {s + 1}/{num_samples}: {n_new} tokens in {dt:.2f}s, {n_new / dt:.1f} tok/s)")
    return results


def results_path(results_file, ckpt_path, name):
    """results_file, or eval_<name>.json beside the checkpoint."""
    return results_file or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"eval_{name}.json")


def save_results(path, head, result, markdown):
    """Print the markdown table and write head (ckpt_path, iter, mode), the result and the table as JSON."""
    print(markdown)
    write_json(path, dict(head, **result, markdown=markdown))
    print(f"results -> {path}")


def run_ppl(model, tok, path, tokenizer_sha256, stride, val_max_tokens, text_field, max_docs, batch_size, device,
            autocast_ctx):
    """Loss, perplexity and bits per character of a token file or raw text (babyllama/ppl_data.py), every token
    scored once in windows advancing by stride tokens (0 = half the context). Returns (result, markdown)."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"no data to score: pass --val_data (tried {path!r})")
    context = model.args.max_seq_len
    if stride > context:
        raise SystemExit(f"stride {stride} is longer than the context ({context} tokens)")
    stride = stride or context // 2
    if path.endswith(".bin"):
        seqs, n_chars, n_docs = ppl_bin(tok, path, model.args.vocab_size, tokenizer_sha256, val_max_tokens)
    else:
        seqs, n_chars, n_docs = ppl_text(tok, path, text_field, max_docs)
    total, n = sequence_loss(model, seqs, stride, batch_size, device, autocast_ctx, desc="ppl")
    if n == 0 or n_chars == 0:
        raise SystemExit(f"{path}: nothing to score ({n} tokens, {n_chars} characters)")
    loss = total / n
    r = dict(val_data=path, val_loss=loss, perplexity=math.exp(loss), bits_per_char=bits_per_character(total, n_chars),
             val_tokens=n, characters=n_chars, documents=n_docs, stride=stride)
    md = ("| data | documents | tokens | characters | loss (nats/token) | perplexity | bits/character |\n"
          "|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {path} | {n_docs:,} | {n:,} | {n_chars:,} | {loss:.4f} | {math.exp(loss):.2f} | {r['bits_per_char']:.4f} |"
          f"\n\n(every token once; windows of {context} tokens advancing by {stride})")
    return r, md


def chat_interactive(model, tok, sampling, max_new_tokens, system_prompt, device, autocast_ctx):
    """Chat on the terminal: each reply streamed token by token, the oldest exchanges dropped when the
    conversation outgrows the context; /reset clears it, /quit (or end of input) leaves."""
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
            for t in generate_stream(model, torch.tensor(prompt, device=device), max_new_tokens, **sampling,
                                     stop_ids=stop_ids(tok)):
                if t in stops:
                    break
                reply.append(t)
                print(dec.put(t), end="", flush=True)
        print(dec.flush(), flush=True)
        history.append({"role": "assistant", "content": tok.decode(reply)})


def chat_batch(model, tok, path, out_path, sampling, max_new_tokens, system_prompt, batch_size, device,
               autocast_ctx, flagged=()):
    """Answer every question of the file (qa_files.read_questions) in padded batches; JSONL out; exact match
    etc. per kind when references are given (answering.answer_scores), and again without the questions whose
    kind/number is in flagged (contamination.py's keys). Returns those scores."""
    items = read_questions(path)
    for i, it in enumerate(items, 1):
        it["contaminated"] = f"{it.get('kind', '')}/{i}" in flagged
    room = model.args.max_seq_len - max_new_tokens
    prompts = [fit_history(tok, [{"role": "user", "content": it["question"]}], room,
                           it.get("system") or system_prompt)[0] for it in items]
    replies, n_new, dt = generate_replies(model, tok, prompts, max_new_tokens, sampling, batch_size, device,
                                          autocast_ctx, "chat")
    for it, (o, finished) in zip(items, replies):
        it["answer"] = decode_reply(tok, o)
        it["finished"] = finished
    write_jsonl(out_path, items)
    print(f"{len(items)} answers in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} tok/s) -> {out_path}")
    scores = answer_scores(items)
    for kind, s in scores.items():
        print(f"{kind}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                                      if k != "baselines"))
        for name, b in s.get("baselines", {}).items():  # answers that need no model, on the same questions
            print(f"{kind}, baseline {name}: " + ", ".join(f"{k} {b[k]:.3f}" for k in ("bleu4", "rougeL", "chrf")))
    for it in items[:6]:
        print(f"Q: {it['question']}\nA: {it['answer']}")
    return scores


def run_gen(model, tok, items, chat, sampling, max_new_tokens, system_prompt, batch_size, device, autocast_ctx,
            samples_path):
    """Answers for the items of a gen file (qa_files.read_gen_items; the chat template for chat models and for
    "messages"), scored against the references with BLEU-1..4 and ROUGE-L (babyllama/text_metrics.py); one
    JSONL row per sample to samples_path. Returns the corpus-level scores."""
    room = model.args.max_seq_len - max_new_tokens
    prompts = []
    for it in items:
        if "messages" in it or chat:
            msgs = it.get("messages") or [{"role": "user", "content": it["prompt"]}]
            system = msgs[0]["content"] if msgs[0]["role"] == "system" else system_prompt
            prompts.append(fit_history(tok, [m for m in msgs if m["role"] != "system"], room, system)[0])
        else:
            prompts.append(([tok.eos_id] + tok.encode(it["prompt"]))[-room:])
    replies, n_new, dt = generate_replies(model, tok, prompts, max_new_tokens, sampling, batch_size, device,
                                          autocast_ctx, "gen")
    hyps = [decode_reply(tok, o) for o, _ in replies]
    refs = [it["reference"] for it in items]
    corpus = text_metrics.corpus_scores(hyps, refs)
    write_jsonl(samples_path, [dict(line=it["line"], prompt=it.get("prompt"), messages=it.get("messages"),
                                    reference=ref, answer=h, **text_metrics.sample_scores(h, ref, corpus["lang"]))
                               for it, h, ref in zip(items, hyps, refs)])
    print(f"{len(items)} answers in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} tok/s); per sample -> {samples_path}")
    return corpus


def run_mc(model, tok, exam, names, chat, scorings, k_shot, batch_size, prefix_cache, device, autocast_ctx):
    """Accuracy on a multiple-choice set (babyllama.mc.load_exam; names: its subjects' names and categories) per
    subject, per category and on average, by each scoring (babyllama/scoring.py). Returns (summaries by
    scoring, per-question predictions, prompt stats by scoring, notes for the table)."""
    n_q = sum(len(p["questions"]) for p in exam.values())
    t0 = time.time()
    correct, preds, stats = score_mc(model, tok, exam, names, chat, k_shot, scorings, batch_size, device,
                                     autocast_ctx, prefix_cache, desc="mc")
    dt = time.time() - t0
    notes = [f"{n_q:,} questions in {dt:.1f} s ({1000 * dt / n_q:.1f} s per 1,000 questions, batch {batch_size})"]
    for sc in scorings:
        notes.append(f"by {sc}: {stats[sc]['fewer_shots']} prompts with fewer than {k_shot} shots, "
                     f"{stats[sc]['truncated']} cut on the left to fit the context of {model.args.max_seq_len} tokens")
    return {sc: summarize(correct[sc], names) for sc in scorings}, preds, stats, notes, dt


MODES = ("sample", "loss", "ppl", "all", "chat", "mc", "gen")

if __name__ == "__main__":
    for moved in ("contamination", "report"):  # they read files, not a model: scripts of their own (before the
        if f"--mode={moved}" in sys.argv:    # overrides, which would refuse their settings as unknown keys)
            raise SystemExit(f"--mode={moved} is now `python {moved}.py` (same settings)")
    apply_overrides(globals())
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if prompt_format not in ("auto", "plain", "chat"):
        raise SystemExit(f"prompt_format must be auto, plain or chat, not {prompt_format!r}")
    scorings = [x.strip() for x in scoring.split(",") if x.strip()]
    if not scorings or set(scorings) - {"letter", "option"}:
        raise SystemExit(f"scoring must be letter, option or both (letter,option), not {scoring!r}")
    if not (stride >= 0 and val_max_tokens >= 0 and k_shot >= 0):
        raise SystemExit(f"want stride >= 0, val_max_tokens >= 0 and k_shot >= 0; got stride {stride}, "
                         f"val_max_tokens {val_max_tokens}, k_shot {k_shot}")
    for name, path in (("mc_data", mc_data if mode == "mc" else None), ("gen_file", gen_file if mode == "gen" else None)):
        if path is not None and not os.path.exists(path):
            raise SystemExit(f"--mode={mode} needs --{name}: {path!r} does not exist")
    try:  # the inputs are read and checked before a model is loaded
        exam = load_exam(mc_data, split, shots_split, k_shot, subjects) if mode == "mc" else None
        flagged_ids = flagged_keys(contamination_file) if mode in ("mc", "chat") and contamination_file else None
        gen_items = read_gen_items(gen_file) if mode == "gen" else None
    except (MCError, OSError) as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(seed)  # before the model is built, which draws from the generator: samples repeat
    model, tok, ckpt, device, autocast_ctx = load_for_inference(ckpt_path, device, dtype, tokenizer_model)
    if quantize:
        full, small = quantize_model(model, quantize)
        print(f"int8 weights: {full / 2**20:.1f} MiB -> {small / 2**20:.1f} MiB")
    if compile:
        compile_decode(model)
    print(f"loaded {ckpt_path}: iteration {ckpt['iter_num']}, {model.num_params() / 1e6:.2f}M parameters")
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, repetition_penalty=repetition_penalty)
    head = dict(ckpt_path=ckpt_path, iter=ckpt["iter_num"], mode=mode)  # what every results file starts with
    label = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))  # the model's name in tables
    chat_model = prompt_format == "chat" or (prompt_format == "auto" and "init_ckpt" in ckpt)
    results = {}  # what results_file gets in modes sample, all and chat
    if mode == "chat" and questions_file:
        out = answers_file or questions_file + ".answers.jsonl"
        results["chat_scores"] = chat_batch(model, tok, questions_file, out, sampling, max_new_tokens, system_prompt,
                                            batch_size, device, autocast_ctx, flagged_ids or ())
    elif mode == "chat":
        chat_interactive(model, tok, sampling, max_new_tokens, system_prompt, device, autocast_ctx)
    if mode in ("sample", "all"):
        if prompt_file:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        results["samples"] = sample(model, tok, prompts, sampling, max_new_tokens, num_samples, stream, device,
                                    autocast_ctx)
    if mode in ("ppl", "loss", "all"):
        r, md = run_ppl(model, tok, val_data or ckpt["config"].get("val_data", ""), ckpt.get("tokenizer_sha256"),
                        stride, val_max_tokens, text_field, max_docs, batch_size, device, autocast_ctx)
        if mode == "all":
            print(md)
            results.update(r)
        else:
            save_results(results_path(results_file, ckpt_path, "ppl"), head, r, md)
    if mode == "mc":
        bench = benchmark or guess_benchmark(mc_data)
        names = load_subjects(bench, mc_data)
        n_q = sum(len(p["questions"]) for p in exam.values())
        print(f"{bench} {split}: {len(exam)} subjects, {n_q:,} questions, {k_shot}-shot, "
              f"{'chat template' if chat_model else 'plain prompt'}, scoring by {' and '.join(scorings)}")
        summaries, preds, stats, notes, dt = run_mc(model, tok, exam, names, chat_model, scorings, k_shot, batch_size,
                                                    prefix_cache, device, autocast_ctx)
        n_flagged = None
        if flagged_ids is not None:
            n_flagged = sum(f"{s}/{q['id']}" in flagged_ids for s, p in exam.items() for q in p["questions"])
            notes.append(f"{n_flagged} of {n_q} questions have a near-duplicate in the training data "
                         f"({contamination_file})")
        md = results_tables(summaries, names, label, k_shot) + "\n\n" + "\n".join(f"- {x}" for x in notes)
        path = results_path(results_file, ckpt_path, f"mc_{bench}_{split}_{k_shot}shot")
        preds_path = os.path.splitext(path)[0] + ".predictions.jsonl"
        write_jsonl(preds_path, preds)
        save_results(path, head, dict(mc_data=mc_data, benchmark=bench, split=split, k_shot=k_shot,
                                      chat=chat_model, scores=summaries, prompt_stats=stats, seconds=dt,
                                      questions=n_q, contaminated=n_flagged, predictions=preds_path), md)
    if mode == "gen":
        path = results_path(results_file, ckpt_path, "gen")
        samples_path = os.path.splitext(path)[0] + ".samples.jsonl"
        corpus = run_gen(model, tok, gen_items, chat_model, sampling, max_new_tokens, system_prompt, batch_size, device,
                         autocast_ctx, samples_path)
        md = text_metrics.scores_table([(label, corpus)])
        md += (f"\n\n(corpus-level, in %; {'characters' if corpus['lang'] == 'zh' else 'words'} as tokens; "
               f"{gen_file}; temperature {temperature})")
        save_results(path, head, dict(gen_file=gen_file, scores=corpus, samples=samples_path), md)
    if results_file and mode in ("sample", "all", "chat"):
        write_json(results_file, dict(head, **results))
        print(f"results -> {results_file}")
