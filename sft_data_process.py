"""
Instruction data in the formats people download -> one unified conversation file for sft.py.

    python sft_data_process.py --inputs=../shared/data/sft/alpaca_zh_demo.json,../shared/data/sft/sharegpt_zh_1K_format.jsonl \
        --tokenizer_model=out/demo/tok8k.model --out_dir=out/sft_data
    python sft_data_process.py --demo_poetry=data/chinese-poetry --tokenizer_model=out/demo/tok8k.model --out_dir=out/demo/sft_data

Output, in out_dir: train.jsonl and val.jsonl (or .parquet), one conversation per line
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "system": "..." or null, "source": "<file name>"}
(babyllama.conversations.load_conversations reads them back) and stats.json with every counter printed.

Input formats (Alpaca, BELLE, ShareGPT, OpenAI messages) are detected per record, in .json arrays or concatenated
records, .jsonl and .parquet (.gz too); see babyllama/conversations.py. Malformed records (bad JSON, unknown
format, wrong field types) are skipped, counted by reason and the first ones named as file:line. Filters, each
counted: empty turns, turns that do not alternate user/assistant (or do not end with the assistant),
conversations longer than max_seq_len + 1 tokens after the chat template (overlong="drop", or "truncate" to the
longest prefix of whole exchanges that fits), and exact duplicates. Sources mix with `ratios` (a ratio of 0.5
keeps a random half of a source, 2.0 repeats it twice, 1.5 once plus a random half), deterministic with `seed`;
`val_fraction` of the conversations is held out.

Every input is read and checked before out_dir is touched. An input that gives no usable conversation (empty,
all malformed, all filtered), a demo corpus that gives none, or no training conversation left after mixing and
the split, is an error naming the input(s) and how many records were dropped for what (exit status 1), and so
is a path that is not a readable file; nothing is written or replaced then. Every output is written atomically.

Evaluation hold-out (make demo-zh): from each Q&A input (e.g. the doctor Q&A CSV) and each translation-pair input,
eval_holdout conversations are held out by a hash of their text and written to eval_questions.jsonl as
{"question", "reference", "kind": "qa" | "pairs", "baselines"} for eval.py --mode=chat, never trained on. Their
baselines: "copy" (a pair's classical text returned as it is) and "nearest" (the answer of the training question
closest in character bigrams, nearest_answer). With heldout_corpus and token_meta, only pairs whose modern sentence
is a line of a pretraining validation document (data_process.py's split rule) are held out, and all such pairs
are, so neither pretraining nor SFT saw an evaluated answer. `fill` fills {{name}}-style placeholders (identity
templates) in every turn; a conversation left with one is dropped and counted.

--demo_poetry builds a demo set from the chinese-poetry corpus' own metadata (titles, authors, lines) so the
demo needs no other download; see babyllama.poetry.build_poetry_demo(). Its held-out poems also give
eval_questions.jsonl.
"""
from collections import Counter
import hashlib
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from babyllama.atomic import atomic_path, write_json, write_jsonl
from babyllama.configurator import run_main
from babyllama.conversations import check_conversation, read_raw_conversations, translation_prompt
from babyllama.poetry import build_poetry_demo
from babyllama.readers import read_parquet
from babyllama.records import ReadErrors, nothing_usable
from babyllama.split import is_val
from tokenizer import Tokenizer
from tokenizer.chat_template import encode_conversation

# -----------------------------------------------------------------------------------------------------------
inputs = ""  # comma-separated files (.json, .jsonl, .parquet, .csv)
ratios = ""  # comma-separated sampling ratio per input ("" = 1 each)
demo_poetry = ""  # path to the chinese-poetry corpus: add the demo poetry SFT set
demo_max_poems = 8000  # poems used for the demo set (regular 5/7-character poems, picked with seed)
demo_eval_poems = 200  # of which held out for evaluation (no conversation about them is trained on)
tokenizer_model = ""  # needed for the length filter; "" = no length filter
max_seq_len = 256  # the model's context; conversations are at most max_seq_len + 1 tokens
overlong = "drop"  # 'drop' or 'truncate'
dedup = True
val_fraction = 0.02
out_dir = "out/sft_data"
out_format = "jsonl"  # 'jsonl' or 'parquet'
seed = 1337
fill = ""  # placeholders filled in every turn, e.g. "name=BabyLlama,author=babyllama": {{name}} -> BabyLlama
eval_holdout = 0  # conversations held out per Q&A and translation-pair input as evaluation questions
heldout_corpus = ""  # pairs: held out from the pretraining corpus' validation documents only (clean_data's parquet)
token_meta = ""  # ... under the split of this data_process.py meta.json (its val_fraction and seed)
# -----------------------------------------------------------------------------------------------------------
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def read_source(path, filt, errors, formats):
    """The conversations of one input file that pass filt (a Filter shared by all inputs, so duplicates across
    them count), printing how many were parsed and kept. Records the reader skips go to errors (a ReadErrors),
    the formats found to the Counter formats. Raises ValueError naming the file, how many records were dropped
    and why, when none is kept; FileNotFoundError, IsADirectoryError or ValueError for a path that is not a
    readable .json, .jsonl, .parquet or .csv file."""
    read_before, filter_before = Counter(errors.by_reason), Counter(filt.counts)
    parsed = list(read_raw_conversations(path, errors, formats))
    kept = [c for c in map(filt, parsed) if c is not None]
    print(f"{path}: {len(parsed):,} conversations parsed, {len(kept):,} kept")
    if not kept:
        filtered = Counter({k: v for k, v in (filt.counts - filter_before).items() if "kept" not in k})
        raise nothing_usable(path, "conversation", errors, (Counter(errors.by_reason) - read_before) + filtered)
    return kept


def read_demo(path, tok, limit, seed):
    """The demo set of the chinese-poetry corpus at path through its own Filter: (train conversations, held-out
    conversations, evaluation questions, stats). Raises ValueError naming the corpus and the counts when no
    training conversation is left (no regular poem found, all of them held out, all filtered)."""
    demo_filter = Filter(tok, limit, overlong, dedup)
    corpus_errors = ReadErrors(max_examples=3)  # the corpus reader's own skips, summarised only
    dtrain, dval, questions, demo_stats = build_poetry_demo(path, demo_max_poems, demo_eval_poems, seed,
                                                            corpus_errors)
    demo_stats["corpus records skipped by the reader"] = corpus_errors.count
    dtrain = [c for c in map(demo_filter, dtrain) if c is not None]
    dval = [c for c in map(demo_filter, dval) if c is not None]
    demo_stats["filters"] = dict(demo_filter.counts)
    if not dtrain:
        raise ValueError(f"{path}: no demo training conversation (demo_max_poems={demo_max_poems}, "
                         f"demo_eval_poems={demo_eval_poems} held out): {demo_stats}; {corpus_errors.brief()}")
    print(f"demo set from {path}: {demo_stats['regular poems found']:,} regular poems, {demo_max_poems:,} picked, "
          f"{demo_eval_poems:,} held out; {len(dtrain):,} train and {len(dval):,} val conversations "
          f"(filters: {', '.join(f'{k} {v:,}' for k, v in demo_filter.counts.most_common())}; "
          f"{corpus_errors.count:,} corpus records the reader skipped)")
    return dtrain, dval, questions, demo_stats



def conversation_length(tok, conv):
    """Tokens of the conversation after the chat template (tok: a tokenizer.Tokenizer)."""
    return len(encode_conversation(tok, conv["messages"], conv["system"])[0])


def fit_length(tok, conv, limit, mode):
    """conv if it fits limit tokens; with mode 'truncate' the longest prefix of whole user/assistant
    exchanges that fits; None if nothing fits (or mode is 'drop'). Returns (conv or None, truncated)."""
    if conversation_length(tok, conv) <= limit:
        return conv, False
    if mode != "truncate":
        return None, False
    msgs = conv["messages"]
    for n in range(len(msgs) - 2, 0, -2):
        cut = dict(conv, messages=msgs[:n])
        if conversation_length(tok, cut) <= limit:
            return cut, True
    return None, False


def conversation_key(conv):
    """Hex digest of the system prompt and turns: equal for exact duplicates whatever their source."""
    blob = json.dumps([conv["system"], conv["messages"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def conversation_text(conv):
    return "\n".join([conv.get("system") or ""] + [m["content"] for m in conv["messages"]])


def fill_placeholders(conv, values):
    """conv with each {{key}} of values replaced by its value in the system prompt and every turn (the identity
    templates' {{name}} and {{author}}); other placeholders stay (the Filter drops what still has one)."""
    if not values or "{{" not in conversation_text(conv):
        return conv
    sub = lambda text: PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)  # noqa: E731
    return dict(conv, system=sub(conv["system"]) if conv.get("system") else conv.get("system"),
                messages=[dict(m, content=sub(m["content"])) for m in conv["messages"]])


def char_ngrams(text, n=2):
    """The set of character n-grams of text (whitespace removed)."""
    text = "".join(text.split())
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


def nearest_answer(question, pool):
    """The answer of the pool's question with the highest Jaccard overlap of character bigrams with question (the
    first on ties): a retrieval baseline that needs no model. pool: [(char_ngrams(question), answer)]."""
    q = char_ngrams(question)
    best, answer = -1.0, ""
    for grams, a in pool:
        overlap = len(q & grams) / len(q | grams)
        if overlap > best:
            best, answer = overlap, a
    return answer


def held_out_lines(corpus, meta_path):
    """The lines of the corpus' documents that data_process.py put in val (babyllama.split.is_val with the
    val_fraction and seed its meta.json records) and in no training document (the same sentence can open two
    chapters, or two books), as a set."""
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if "val_fraction" not in meta or "seed" not in meta:
        raise ValueError(f"{meta_path}: no val_fraction/seed (want the meta.json data_process.py writes)")
    val, train = set(), set()
    for doc in read_parquet(corpus, corpus, "text"):
        side = val if is_val(doc["text"], meta["val_fraction"], meta["seed"]) else train
        side.update(line.strip() for line in doc["text"].split("\n"))
    return val - train


def text_hash(text):
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def hold_out(convs, n, val_lines):
    """Split one input's conversations into (training, evaluation questions). Q&A: n questions by hash order, and
    every conversation asking one of them leaves training (a question asked twice is never on both sides). Pairs:
    with val_lines, every pair whose modern sentence is one of them leaves training and n of them by hash order
    become questions; with val_lines None, n pairs by hash order. Other formats are all training."""
    if not n or not convs or convs[0]["format"] not in ("qa", "pairs"):
        return convs, []
    kind = convs[0]["format"]
    eligible = [c for c in convs
                if kind == "qa" or val_lines is None or c["messages"][1]["content"].strip() in val_lines]
    by_question = {c["messages"][0]["content"]: c for c in reversed(eligible)}  # each question once (its first)
    chosen = sorted(by_question.values(), key=lambda c: text_hash(c["messages"][0]["content"]))[:n]
    if kind == "qa":
        asked = {c["messages"][0]["content"] for c in chosen}
        train = [c for c in convs if c["messages"][0]["content"] not in asked]
    else:
        out = {id(c) for c in (chosen if val_lines is None else eligible)}
        train = [c for c in convs if id(c) not in out]
    pool = [(char_ngrams(c["messages"][0]["content"]), c["messages"][1]["content"]) for c in train]
    questions = []
    for c in chosen:
        q, ref = c["messages"][0]["content"], c["messages"][1]["content"]
        if kind == "pairs":  # asked the same way every time; the copy baseline returns the classical text
            q, baselines = translation_prompt(c["classical"], 0), {"copy": c["classical"]}
        else:
            baselines = {"nearest": nearest_answer(q, pool)}
        questions.append({"question": q, "reference": ref, "kind": kind, "baselines": baselines,
                          "source": c["source"]})
    return train, questions


class Filter:
    """Applies the filters in order (usable turns, exact duplicates, length in tokens when tok and limit are
    given), counting each reason in .counts; calling it returns the conversation kept (maybe truncated) or
    None."""

    def __init__(self, tok=None, limit=0, mode="drop", dedup=True, values=None):
        self.tok, self.limit, self.mode, self.dedup, self.values = tok, limit, mode, dedup, values or {}
        self.counts = Counter()
        self.seen = set()

    def __call__(self, conv):
        conv = fill_placeholders(conv, self.values)
        reason = check_conversation(conv) or (self.values and PLACEHOLDER.search(conversation_text(conv)) and
                                              "unfilled placeholder")
        if reason:
            self.counts[reason] += 1
            return None
        if self.dedup:
            key = conversation_key(conv)
            if key in self.seen:
                self.counts["exact duplicate"] += 1
                return None
            self.seen.add(key)
        if self.tok is not None and self.limit:
            conv, truncated = fit_length(self.tok, conv, self.limit, self.mode)
            if conv is None:
                self.counts[f"longer than {self.limit} tokens (dropped)"] += 1
                return None
            if truncated:
                self.counts[f"longer than {self.limit} tokens (truncated, kept)"] += 1
        self.counts["kept"] += 1
        return conv


def mix(sources, ratios, rng):
    """sources: list of lists. ratio r keeps floor(r) copies of each list plus a random (r - floor r) part."""
    out = []
    for convs, r in zip(sources, ratios):
        whole = int(r)
        out += convs * whole
        frac = r - whole
        if frac > 0:
            out += rng.sample(convs, round(frac * len(convs)))
    return out


def write_conversations(path, convs, fmt):
    """The conversations in the unified form, as JSONL (fmt 'jsonl') or parquet ('parquet'), written to a
    temporary file first and renamed, so a reader never sees half a file (and a failed write leaves none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = [{"messages": c["messages"], "system": c.get("system"), "source": c.get("source", "")} for c in convs]
    if fmt != "parquet":
        write_jsonl(path, rows)
        return
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def main():
    """Read, filter, mix and split the inputs (and the demo set) and write out_dir. Every input is read and
    checked before out_dir is touched: raises ValueError naming the input(s) and the counts when an input gives
    no usable conversation or no training conversation is left, OSError for a path that is not a readable
    file; nothing is written then. Returns the stats dict."""
    if overlong not in ("drop", "truncate"):
        raise SystemExit(f"overlong must be 'drop' or 'truncate', not {overlong!r}")
    tok = None
    if tokenizer_model:
        tok = Tokenizer(tokenizer_model)
    paths = [p for p in inputs.split(",") if p]
    rs = [float(r) for r in ratios.split(",") if r] or [1.0] * len(paths)
    if len(rs) != len(paths):
        raise SystemExit(f"{len(paths)} inputs but {len(rs)} ratios")
    if not paths and not demo_poetry:
        raise SystemExit("nothing to do: give --inputs=... and/or --demo_poetry=...")
    errors, formats = ReadErrors(), Counter()
    limit = max_seq_len + 1 if max_seq_len else 0  # max_seq_len + 1 tokens give max_seq_len targets
    if any("=" not in kv for kv in fill.split(",") if kv):
        raise SystemExit(f"fill={fill!r}: want name=value pairs separated by commas (name=BabyLlama,author=...)")
    if heldout_corpus and not token_meta:
        raise SystemExit("heldout_corpus needs token_meta: the meta.json of the token files made from it (its split)")
    values = dict(kv.split("=", 1) for kv in fill.split(",") if kv)
    filt = Filter(tok, limit, overlong, dedup, values)
    per_source = [read_source(p, filt, errors, formats) for p in paths]
    val_lines = held_out_lines(heldout_corpus, token_meta) if heldout_corpus else None
    questions = []
    for i, convs in enumerate(per_source):
        per_source[i], held = hold_out(convs, eval_holdout, val_lines)
        if eval_holdout and not held and convs[0]["format"] in ("qa", "pairs"):
            raise SystemExit(f"{paths[i]}: no conversation to hold out for evaluation (pairs: none has its modern "
                             f"sentence in a validation document of {heldout_corpus}; wrong corpus or token_meta?)")
        questions += held
        if held:
            print(f"{paths[i]}: {len(held)} held out as evaluation questions, {len(per_source[i]):,} left to train on")
    rng = random.Random(seed)
    convs = mix(per_source, rs, rng)
    rng.shuffle(convs)
    n_val = int(round(val_fraction * len(convs))) if convs else 0
    val, train = convs[:n_val], convs[n_val:]
    stats = {}
    if demo_poetry:
        dtrain, dval, demo_questions, stats["demo"] = read_demo(demo_poetry, tok, limit, seed)
        questions += demo_questions
        train, val = train + dtrain, val + dval
        rng.shuffle(train)
    if not train:  # e.g. every ratio 0, or val_fraction holding out all of a small set
        raise ValueError(f"no training conversation left from {', '.join(paths)}: {len(convs)} after mixing with "
                         f"ratios {rs}, {n_val} of them held out for val (val_fraction={val_fraction})")
    turns = Counter(len(c["messages"]) // 2 for c in train + val)
    shares = Counter(c.get("source", "") for c in train)  # each input's share of the training conversations
    stats["train_share"] = {k: round(n / len(train), 4) for k, n in shares.most_common()}
    print("training conversations per input: " + ", ".join(f"{k} {n:,} ({n / len(train):.1%})"
                                                            for k, n in shares.most_common()))
    if paths:  # counters of the --inputs files; the demo set's are in stats["demo"]
        stats.update(formats=dict(formats), filters=dict(filt.counts), malformed=errors.to_dict())
    stats.update(
                 train=len(train), val=len(val), exchanges_per_conversation=dict(sorted(turns.items())),
                 with_system=sum(1 for c in train + val if c.get("system")))
    # everything is checked: only now is out_dir touched
    ext = "parquet" if out_format == "parquet" else "jsonl"
    os.makedirs(out_dir, exist_ok=True)
    qpath = os.path.join(out_dir, "eval_questions.jsonl")
    if questions:
        write_jsonl(qpath, questions)
        print(f"{len(questions)} evaluation questions -> {qpath}")
    elif os.path.exists(qpath):  # a previous run's questions may be in this run's training data
        os.remove(qpath)
    write_conversations(os.path.join(out_dir, f"train.{ext}"), train, out_format)
    write_conversations(os.path.join(out_dir, f"val.{ext}"), val, out_format)
    write_json(os.path.join(out_dir, "stats.json"), stats)
    if paths:  # the --inputs files' counters (the demo set printed its own above)
        print(f"formats detected: {dict(formats)}")
        print("filters: " + ", ".join(f"{k} {v:,}" for k, v in filt.counts.most_common()))
        print(errors.report())
    print(f"exchanges per conversation: {dict(sorted(turns.items()))}; with a system prompt: {stats['with_system']}")
    print(f"wrote {len(train):,} train and {len(val):,} val conversations to {out_dir}")
    return stats


if __name__ == "__main__":
    run_main(globals(), main)
