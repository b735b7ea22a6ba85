"""
Measure a checkpoint. One script, one mode per kind of measurement; every mode shows a progress bar, writes a JSON
result file (--results_file; by default beside the checkpoint) and prints a markdown table.

    python eval.py --ckpt_path=out/pretrain/ckpt.pt                          # continuations of a few prompts
    python eval.py --mode=ppl --val_data=out/data/poetry/val.bin             # loss, perplexity, bits per char
    python eval.py --mode=ppl --val_data=some.txt                            # ... on raw text (.txt/.jsonl/.parquet)
    python eval.py --mode=mc --mc_data=../shared/data/ceval --split=val --k_shot=5     # C-Eval / CMMLU tables
    python eval.py --mode=mc --mc_data=out/demo/poetry_bench                 # the poetry benchmark (poetry_bench.py)
    python eval.py --mode=gen --gen_file=qa.jsonl                            # BLEU-1..4, ROUGE-L against references
    python eval.py --mode=contamination --eval_set=out/demo/poetry_bench --train_data=out/demo/data/train.bin
    python eval.py --mode=report --run_dir=out/demo                          # report.md of a whole run
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
gen: JSONL {"prompt" | "messages", "reference"}; greedy answers, scored by babyllama/text_metrics.py; per-sample JSONL.
contamination: evaluation items whose shingles a training document contains (babyllama/contamination.py).

Chat mode uses the chat template (tokenizer/chat_template.py), streams the reply token by token through the
KV-cached generate_stream and stops on <|end|>. A LoRA checkpoint from sft.py is loaded as base + adapter,
merged. Batch chat: questions_file is .txt (one question per line) or .jsonl ({"question", optional
"system", "reference", "kind"}); answers go to answers_file as JSONL, and when references are given the
exact-match rate is printed per kind (for kind "poem", also the rate of well-formed 5/7-character poems).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from babyllama import models, precision, report, text_metrics, token_files
from babyllama.atomic import write_json, write_jsonl
from babyllama.configurator import apply_overrides
from babyllama.contamination import find_contamination, flagged
from babyllama.generate import compile_decode, generate, generate_stream, right_pad
from babyllama.int8 import quantize_int8
from babyllama.mc import MCError, category_table, guess_benchmark, load_exam, load_subjects, subject_table, summarize
from babyllama.memory import model_bytes
from babyllama.poetry import well_formed_poem
from babyllama.readers import iter_documents, read_txt
from babyllama.records import ReadErrors, iter_records
from babyllama.scoring import bits_per_character, score_mc, sequence_loss
from tokenizer import StreamDecoder, Tokenizer
from tokenizer.chat_template import decode_reply, encode_prompt, stop_ids

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in the checkpoint
mode = "sample"  # sample, ppl (or loss), all (sample + ppl), chat, mc, gen, contamination, report
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
quantize = ""  # 'int8': weight-only int8 linear layers (model.quantize_int8), a quarter of their fp32 memory
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
contamination_file = ""  # mc: JSON from --mode=contamination; flagged items are counted in the table
# gen
gen_file = ""  # JSONL {"prompt" | "messages", "reference"}
# contamination
eval_set = ""  # an mc folder (its --split) or a gen JSONL file
train_data = ""  # the training data: a .bin of data_process.py (decoded) or any corpus clean_data reads
threshold = 0.5  # an item is flagged when one training document contains this share of its 5-gram shingles
# report
run_dir = "out/demo"  # report: the run folder (pretrain/, sft/, dpo/, eval results)
# -----------------------------------------------------------------------------------------------------------


def sample(model, tok, prompt_list, device, autocast_ctx):
    """Continue each prompt; all prompts go through generate() together as one padded batch."""
    # every training document follows an eos, so starting a prompt with eos puts the model at a document start
    encoded = [[tok.eos_id] + tok.encode(p) for p in prompt_list]
    idx, lens = right_pad(encoded)
    opts = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                repetition_penalty=repetition_penalty, stop_ids=[tok.eos_id])
    results = []
    for s in range(num_samples):
        if stream:
            for p, e in zip(prompt_list, encoded):
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
        for p, o in zip(prompt_list, outs):
            text = tok.decode([t for t in o if t != tok.eos_id])
            print(f"--- {p}{text}")
            results.append({"prompt": p, "completion": text})
        print(f"(sample {s + 1}/{num_samples}: {n_new} tokens in {dt:.2f}s, {n_new / dt:.1f} tok/s)")
    return results


def default_results(name):
    """results_file, or eval_<name>.json beside the checkpoint."""
    return results_file or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"eval_{name}.json")


def save_results(name, result, markdown):
    """Print the markdown table and write the result (with the table) as JSON; returns the path."""
    print(markdown)
    path = default_results(name)
    write_json(path, dict(ckpt_path=ckpt_path, iter=ckpt["iter_num"], mode=mode, **result, markdown=markdown))
    print(f"results -> {path}")
    return path


def ppl_bin(model, tok, path):
    """(sequences to score, characters, documents) of the first val_max_tokens tokens of a uint16 token file, read
    as one sequence after an eos (documents separated by eos, which is scored like every token, as in training).
    The file is checked as training checks it (babyllama.token_files.open_bins). Characters: of the decoded documents."""
    bins, paths, _ = token_files.open_bins(path, model.args.vocab_size, like=tokenizer_of_model, min_tokens=2)
    if len(bins) > 1:
        raise SystemExit(f"--mode=ppl evaluates one token file; {path!r} is {len(paths)}: {', '.join(paths)}")
    # the file's first document follows no eos: put one before it, as before every other, so all are scored
    data = bins[0][:val_max_tokens] if val_max_tokens else bins[0]
    seq = np.concatenate([[tok.eos_id], np.asarray(data, dtype=np.int64)])
    cuts = np.flatnonzero(seq[1:] == tok.eos_id) + 1  # the scored tokens, split into documents at eos
    n_chars = sum(len(tok.decode(part[part != tok.eos_id].tolist())) for part in np.split(seq[1:], cuts - 1))
    return [seq], n_chars, len(cuts)


def ppl_text(model, tok, path):
    """(sequences to score, characters, documents) of raw text (any file or folder clean_data's readers read):
    each document as eos + tokens + eos (data_process.py's layout); characters: of the texts."""
    errors = ReadErrors()
    seqs, n_chars = [], 0
    for doc in iter_documents([path], text_field=text_field or None, errors=errors):
        seqs.append([tok.eos_id] + tok.encode(doc["text"]) + [tok.eos_id])
        n_chars += len(doc["text"])
        if max_docs and len(seqs) >= max_docs:
            break
    if errors.count:
        print(errors.report())
    if not seqs:
        raise SystemExit(f"{path}: no document to score ({errors.brief()}); --mode=ppl reads a token file (.bin) "
                         f"or text documents (.txt, or .jsonl/.parquet with a text field: --text_field names it)")
    return seqs, n_chars, len(seqs)


def run_ppl(model, tok, device, autocast_ctx):
    path = val_data or ckpt["config"].get("val_data", "")
    if not path or not os.path.exists(path):
        raise SystemExit(f"no data to score: pass --val_data (tried {path!r})")
    if stride > model.args.max_seq_len:
        raise SystemExit(f"stride {stride} is longer than the context ({model.args.max_seq_len} tokens)")
    seqs, n_chars, n_docs = (ppl_bin if path.endswith(".bin") else ppl_text)(model, tok, path)
    total, n = sequence_loss(model, seqs, stride or model.args.max_seq_len // 2, batch_size, device, autocast_ctx,
                             desc="ppl")
    if n == 0 or n_chars == 0:
        raise SystemExit(f"{path}: nothing to score ({n} tokens, {n_chars} characters)")
    loss = total / n
    r = dict(val_data=path, val_loss=loss, perplexity=math.exp(loss), bits_per_char=bits_per_character(total, n_chars),
             val_tokens=n, characters=n_chars, documents=n_docs, stride=stride or model.args.max_seq_len // 2)
    md = ("| data | documents | tokens | characters | loss (nats/token) | perplexity | bits/character |\n"
          "|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {path} | {n_docs:,} | {n:,} | {n_chars:,} | {loss:.4f} | {math.exp(loss):.2f} | {r['bits_per_char']:.4f} |"
          f"\n\n(every token once; windows of {model.args.max_seq_len} tokens advancing by {r['stride']})")
    return r, md


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
            for t in generate_stream(model, torch.tensor(prompt, device=device), max_new_tokens, **_gen_opts(tok)):
                if t in stops:
                    break
                reply.append(t)
                print(dec.put(t), end="", flush=True)
        print(dec.flush(), flush=True)
        history.append({"role": "assistant", "content": tok.decode(reply)})


def kept(path, items, errors, none_left):
    """The items read from path, after printing what was skipped; none at all is an error naming the file."""
    if errors.count:
        print(errors.report())
    if not items:
        raise SystemExit(f"{path}: {none_left} ({errors.count} lines skipped)")
    return items


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
    return kept(path, items, errors, "no question to answer")


def generate_replies(model, tok, prompts, device, autocast_ctx, desc):
    """Generate for each prompt (list of ids) in padded batches of batch_size, with a progress bar. Returns
    ([(reply ids, finished)] in order, new tokens, seconds); a reply is finished when it ended on a stop token."""
    stops = set(stop_ids(tok))
    out, n_new, t0 = [], 0, time.time()
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        idx, lens = right_pad(chunk)
        with autocast_ctx:
            outs = generate(model, idx.to(device), max_new_tokens, prompt_lens=lens, **_gen_opts(tok))
        for o in outs:
            n_new += len(o)
            out.append((o, bool(o) and o[-1] in stops))
        bar.update(len(chunk))
    bar.close()
    return out, n_new, time.time() - t0


def chat_batch(model, tok, device, autocast_ctx, path, out_path):
    """Answer every question of the file in padded batches; JSONL out; exact match etc. when references."""
    items = read_questions(path)
    max_prompt_tokens = model.args.max_seq_len - max_new_tokens
    prompts = [fit_history(tok, [{"role": "user", "content": it["question"]}], max_prompt_tokens,
                           it.get("system") or system_prompt)[0] for it in items]
    replies, n_new, dt = generate_replies(model, tok, prompts, device, autocast_ctx, "chat")
    for it, (o, finished) in zip(items, replies):
        it["answer"] = decode_reply(tok, o)
        it["finished"] = finished
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
        m = text_metrics.corpus_scores([it["answer"] for it in group], [it["reference"] for it in group])
        s.update(bleu4=m["bleu4"], rougeL=m["rougeL"])  # in %, against the reference (babyllama/text_metrics.py)
        scores[kind or "all"] = s
        print(f"{kind or 'all'}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in s.items()))
    for it in items[:6]:
        print(f"Q: {it['question']}\nA: {it['answer']}")
    return scores


def messages_ok(msgs):
    """True for a conversation to answer: an optional system message, then user/assistant turns alternating
    from a user turn to a final user turn, every content a string."""
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        return False
    roles = [m.get("role") for m in msgs]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return bool(roles) and len(roles) % 2 == 1 and all(r == ("user" if i % 2 == 0 else "assistant")
                                                         for i, r in enumerate(roles))


def read_gen_items(path):
    """The items of a gen file: JSONL {"prompt": str | "messages": [{"role", "content"}], "reference": str}.
    Lines without a prompt or a reference string are skipped, counted and named (file:line)."""
    errors, items = ReadErrors(), []
    for line, rec in iter_records(path, errors):
        ok = isinstance(rec, dict) and isinstance(rec.get("reference"), str) and (
            isinstance(rec.get("prompt"), str) and rec["prompt"].strip() or
            isinstance(rec.get("messages"), list) and rec["messages"])
        if not ok:
            errors.add(path, line, "no prompt/messages or reference", 'want {"prompt": "...", "reference": "..."}')
        elif "messages" in rec and not messages_ok(rec["messages"]):
            errors.add(path, line, "bad messages", 'want [{"role": "user"|"assistant"|"system", "content": "..."}, '
                                                    '...] alternating, ending with a user turn')
        else:
            items.append(dict(rec, line=line))
    return kept(path, items, errors, "nothing to generate for")


def run_gen(model, tok, items, chat, device, autocast_ctx):
    """Answers for every prompt of gen_file (read_gen_items; the chat template for chat models and for
    "messages"), scored against the references with BLEU-1..4 and ROUGE-L; per-sample JSONL beside the results."""
    room = model.args.max_seq_len - max_new_tokens
    prompts = []
    for it in items:
        if "messages" in it or chat:
            msgs = it.get("messages") or [{"role": "user", "content": it["prompt"]}]
            system = msgs[0]["content"] if msgs[0]["role"] == "system" else system_prompt
            prompts.append(fit_history(tok, [m for m in msgs if m["role"] != "system"], room, system)[0])
        else:
            prompts.append(([tok.eos_id] + tok.encode(it["prompt"]))[-room:])
    replies, n_new, dt = generate_replies(model, tok, prompts, device, autocast_ctx, "gen")
    hyps = [decode_reply(tok, o) for o, _ in replies]
    refs = [it["reference"] for it in items]
    corpus = text_metrics.corpus_scores(hyps, refs)
    rows = [dict(line=it["line"], prompt=it.get("prompt"), messages=it.get("messages"), reference=ref, answer=h,
                 **text_metrics.sample_scores(h, ref, corpus["lang"])) for it, h, ref in zip(items, hyps, refs)]
    samples_path = os.path.splitext(default_results("gen"))[0] + ".samples.jsonl"
    write_jsonl(samples_path, rows)
    print(f"{len(items)} answers in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} tok/s); per sample -> {samples_path}")
    md = text_metrics.scores_table([(os.path.basename(os.path.dirname(os.path.abspath(ckpt_path))), corpus)])
    md += (f"\n\n(corpus-level, in %; {'characters' if corpus['lang'] == 'zh' else 'words'} as tokens; "
           f"{gen_file}; temperature {temperature})")
    save_results("gen", dict(gen_file=gen_file, scores=corpus, samples=samples_path), md)
    return corpus


def mc_tag():
    return f"mc_{benchmark or guess_benchmark(mc_data)}_{split}_{k_shot}shot"


def flagged_keys(path):
    """{subject/id} of the items a contamination result file (--mode=contamination) flagged."""
    try:
        with open(path, encoding="utf-8") as f:
            return {r["key"] for r in json.load(f)["flagged_items"]}
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a result of --mode=contamination ({type(e).__name__}: {e})") from None


def run_mc(model, tok, exam, scorings, flagged_ids, chat, device, autocast_ctx):
    """Accuracy on a multiple-choice set (babyllama.mc.load_exam), per subject, per category and on average, by
    each scoring; flagged_ids: {subject/id} of the questions flagged by a contamination check (or None)."""
    bench = benchmark or guess_benchmark(mc_data)
    names = load_subjects(bench, mc_data)
    n_q = sum(len(p["questions"]) for p in exam.values())
    print(f"{bench} {split}: {len(exam)} subjects, {n_q:,} questions, {k_shot}-shot, "
          f"{'chat template' if chat else 'plain prompt'}, scoring by {' and '.join(scorings)}")
    t0 = time.time()
    correct, preds, stats = score_mc(model, tok, exam, names, chat, k_shot, scorings, batch_size, device,
                                     autocast_ctx, prefix_cache, desc="mc")
    dt = time.time() - t0
    summaries = {sc: summarize(correct[sc], names) for sc in scorings}
    label = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))
    md = subject_table(summaries, names)
    if len({c for v in names.values() for c in v.get("categories", [])}) > 1:  # the model cards' table first
        md = category_table([(f"{label}, {k_shot}-shot, by {sc}", summaries[sc]) for sc in scorings]) + "\n\n" + md
    else:
        md += "\n| **average** | | " + " | ".join(f"**{100 * summaries[sc]['average']:.1f}**" for sc in scorings) + \
            " |\n\n(accuracy in %; chance is 25%)"
    notes = [f"{n_q:,} questions in {dt:.1f} s ({1000 * dt / n_q:.1f} s per 1,000 questions, batch {batch_size})"]
    for sc in scorings:
        notes.append(f"by {sc}: {stats[sc]['fewer_shots']} prompts with fewer than {k_shot} shots, "
                     f"{stats[sc]['truncated']} cut on the left to fit the context of {model.args.max_seq_len} tokens")
    flagged = None
    if flagged_ids is not None:
        flagged = sum(f"{s}/{q['id']}" in flagged_ids for s, p in exam.items() for q in p["questions"])
        notes.append(f"{flagged} of {n_q} questions have a near-duplicate in the training data ({contamination_file})")
    md += "\n\n" + "\n".join(f"- {x}" for x in notes)
    preds_path = os.path.splitext(default_results(mc_tag()))[0] + ".predictions.jsonl"
    write_jsonl(preds_path, preds)
    save_results(mc_tag(), dict(mc_data=mc_data, benchmark=bench, split=split, k_shot=k_shot, chat=chat,
                                scores=summaries, prompt_stats=stats, seconds=dt, questions=n_q,
                                contaminated=flagged, predictions=preds_path), md)
    return summaries


def contamination_items(path):
    """[{"key", "text"}] of an evaluation set: an mc folder (key subject/id, text question + options) or a gen
    JSONL file (key line number, text the reference)."""
    if os.path.isdir(path):
        exam = load_exam(path, split)
        return [{"key": f"{s}/{q['id']}", "text": q["question"] + "\n" + "\n".join(q["options"])}
                for s, p in exam.items() for q in p["questions"]]
    return [{"key": str(it["line"]), "text": it["reference"]} for it in read_gen_items(path)]


def training_documents(path):
    """The training documents: a .bin of data_process.py decoded document by document (its meta.json names
    the tokenizer), or anything clean_data's readers read."""
    if not path.endswith(".bin"):
        yield from iter_documents([path], text_field=text_field or None)
        return
    meta = token_files.read_meta(path)
    btok = Tokenizer(meta["tokenizer_model"])
    data = np.memmap(path, dtype=np.uint16, mode="r")
    step, start, line = 1 << 24, 0, 0
    while start < len(data):
        block = np.asarray(data[start:start + step])
        ends = np.flatnonzero(block == btok.eos_id)
        if len(ends) == 0 and start + step < len(data):
            raise SystemExit(f"{path}: a document longer than {step} tokens")
        last = ends[-1] + 1 if len(ends) and start + step < len(data) else len(block)
        for part in np.split(block[:last], ends[ends < last - 1] + 1 if len(ends) else []):
            line += 1
            yield {"text": btok.decode(part[part != btok.eos_id].tolist()), "source": path, "line": line}
        start += last


def run_contamination():
    """Flag the items of eval_set that a document of train_data nearly contains; JSON (every flagged item and
    its document) to results_file, or contamination.json in the mc folder / beside the gen file."""
    items = contamination_items(eval_set)
    bar = tqdm(desc="training documents", unit="doc", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    t0 = time.time()
    best, n_docs = find_contamination(items, training_documents(train_data), on_chunk=bar.update)
    bar.close()
    hits = flagged(items, best, threshold)
    share = len(hits) / len(items)
    md = ("| evaluation set | items | training documents | flagged | share |\n|---|---:|---:|---:|---:|\n"
          f"| {eval_set} | {len(items):,} | {n_docs:,} | {len(hits):,} | {100 * share:.1f}% |\n\n"
          f"(flagged: one training document holds >= {threshold:.0%} of the item's character 5-grams; "
          f"{time.time() - t0:.0f} s)")
    if hits:
        md += "\n\n| item | containment | Jaccard | training document |\n|---|---:|---:|---|\n" + "\n".join(
            f"| {h['key']} | {h['containment']:.2f} | {h['jaccard']:.2f} | {h['source']}:{h['line']}: "
            f"{h['excerpt'][:40].replace(chr(10), ' / ').replace('|', '/')} |"
            for h in sorted(hits, key=lambda h: -h["containment"])[:10])
        md += f"\n\n(the {min(10, len(hits))} highest of {len(hits)}; all in the JSON file)"
    path = results_file or os.path.join(eval_set if os.path.isdir(eval_set) else os.path.dirname(eval_set),
                                        "contamination.json")
    print(md)
    write_json(path, dict(eval_set=eval_set, train_data=train_data, threshold=threshold, items=len(items),
                          training_documents=n_docs, flagged=len(hits), share=share, flagged_items=hits,
                          markdown=md))
    print(f"results -> {path}")


MODES = ("sample", "loss", "ppl", "all", "chat", "mc", "gen", "contamination", "report")

if __name__ == "__main__":
    apply_overrides(globals())
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "report":
        report.main(run_dir)
        sys.exit(0)
    if prompt_format not in ("auto", "plain", "chat"):
        raise SystemExit(f"prompt_format must be auto, plain or chat, not {prompt_format!r}")
    scorings = [x.strip() for x in scoring.split(",") if x.strip()]
    if not scorings or set(scorings) - {"letter", "option"}:
        raise SystemExit(f"scoring must be letter, option or both (letter,option), not {scoring!r}")
    if not (stride >= 0 and 0 < threshold <= 1 and val_max_tokens >= 0 and k_shot >= 0):
        raise SystemExit(f"want stride >= 0, 0 < threshold <= 1, val_max_tokens >= 0 and k_shot >= 0; got stride "
                         f"{stride}, threshold {threshold}, val_max_tokens {val_max_tokens}, k_shot {k_shot}")
    for name, path in (("mc_data", mc_data if mode == "mc" else None), ("gen_file", gen_file if mode == "gen" else None),
                       ("eval_set", eval_set if mode == "contamination" else None),
                       ("train_data", train_data if mode == "contamination" else None)):
        if path is not None and not os.path.exists(path):
            raise SystemExit(f"--mode={mode} needs --{name}: {path!r} does not exist")
    try:  # the inputs are read and checked before a model is loaded
        if mode == "contamination":
            run_contamination()
            sys.exit(0)
        exam = load_exam(mc_data, split, shots_split, k_shot, subjects) if mode == "mc" else None
        flagged_ids = flagged_keys(contamination_file) if mode == "mc" and contamination_file else None
        gen_items = read_gen_items(gen_file) if mode == "gen" else None
    except (MCError, OSError) as e:
        raise SystemExit(f"error: {e}")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        precision.configure_cpu()
    autocast_ctx, _ = precision.amp_setup(device_type, precision.resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    model, ckpt = models.load_model(ckpt_path, device)  # any checkpoint: full, or base + LoRA adapter merged
    model.eval()
    if quantize:
        if quantize != "int8":
            raise SystemExit(f"quantize must be '' or 'int8', not {quantize!r}")
        full = model_bytes(model)
        quantize_int8(model)
        print(f"int8 weights: {full / 2**20:.1f} MiB -> {model_bytes(model) / 2**20:.1f} MiB")
    if compile:
        compile_decode(model)
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
    if mode in ("ppl", "loss", "all"):
        r, md = run_ppl(model, tok, device, autocast_ctx)
        if mode == "all":
            print(md)
            results.update(r)
        else:
            save_results("ppl", r, md)
    chat_model = prompt_format == "chat" or (prompt_format == "auto" and "init_ckpt" in ckpt)
    if mode == "mc":
        run_mc(model, tok, exam, scorings, flagged_ids, chat_model, device, autocast_ctx)
    if mode == "gen":
        run_gen(model, tok, gen_items, chat_model, device, autocast_ctx)
    if results_file and mode in ("sample", "all", "chat"):
        write_json(results_file, dict(ckpt_path=ckpt_path, iter=ckpt["iter_num"], mode=mode, **results))
        print(f"results -> {results_file}")
