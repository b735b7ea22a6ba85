"""
Instruction data in the formats people download -> one unified conversation file for sft.py.

    python sft_data_process.py --inputs=../shared/data/sft/alpaca_zh_demo.json,../shared/data/sft/sharegpt_zh_1K_format.jsonl \
        --tokenizer_model=out/demo/tok8k.model --out_dir=out/sft_data
    python sft_data_process.py --demo_poetry=data/chinese-poetry --tokenizer_model=out/demo/tok8k.model --out_dir=out/demo/sft_data

Output, in out_dir: train.jsonl and val.jsonl (or .parquet), one conversation per line
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "system": "..." or null, "source": "<file name>"}
and stats.json with every counter printed.

Input formats, detected per record (.json array / concatenated records, .jsonl, .parquet; .gz too):
  Alpaca   {"instruction", "input", "output", optional "history": [[q, a], ...], optional "system"}
  BELLE    {"instruction", "output"}                       (Alpaca without input)
  ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], optional "system"}
  OpenAI   {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
Malformed records (bad JSON, unknown format, wrong field types) are skipped, counted by reason and the
first ones named as file:line. Filters, each counted: empty turns, turns that do not alternate
user/assistant (or do not end with the assistant), conversations longer than max_len tokens after the
chat template (overlong="drop", or "truncate" to the longest prefix of whole exchanges that fits), and
exact duplicates. Sources mix with `ratios` (a ratio of 0.5 keeps a random half of a source, 2.0 repeats it
twice, 1.5 once plus a random half), deterministic with `seed`; `val_fraction` of the conversations is held out.

--demo_poetry builds a demo set from the chinese-poetry corpus' own metadata (titles, authors, lines) so the
demo needs no other download; see build_poetry_demo(). Its held-out poems also give eval_questions.jsonl.
"""
import gzip
import hashlib
import json
import os
import random
import re
from collections import Counter

from configurator import apply_overrides
from clean_data.readers import ReadErrors, _JsonStream, _JsonStreamError, iter_documents

# -----------------------------------------------------------------------------------------------------------
inputs = ""  # comma-separated files (.json, .jsonl, .parquet)
ratios = ""  # comma-separated sampling ratio per input ("" = 1 each)
demo_poetry = ""  # path to the chinese-poetry corpus: add the demo poetry SFT set
demo_max_poems = 8000  # poems used for the demo set (regular 5/7-character poems, picked with seed)
demo_eval_poems = 200  # of which held out for evaluation (no conversation about them is trained on)
tokenizer_model = ""  # needed for the length filter; "" = no length filter
max_len = 256  # the model's context (max_seq_len); conversations are at most max_len + 1 tokens
overlong = "drop"  # 'drop' or 'truncate'
dedup = True
val_fraction = 0.02
out_dir = "out/sft_data"
out_format = "jsonl"  # 'jsonl' or 'parquet'
seed = 1337
# -----------------------------------------------------------------------------------------------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


class BadRecord(Exception):
    """reason: a short category (counted), detail: the specifics (shown in the first examples)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _str(value, what):
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord("field not a string", f"{what} is {type(value).__name__}")
    return value


def _turns(items, role_key, content_key, role_map, what):
    if not isinstance(items, list):
        raise BadRecord("turns not a list", f"{what} is {type(items).__name__}")
    out = []
    for m in items:
        if not isinstance(m, dict) or role_key not in m:
            raise BadRecord("turn without a role", f"a {what} item has no {role_key!r}")
        role = role_map.get(str(m[role_key]).lower())
        if role is None:
            raise BadRecord("unknown role", repr(m[role_key]))
        out.append({"role": role, "content": _str(m.get(content_key), f"{what} {content_key}")})
    return out


def parse_record(rec):
    """One downloaded record -> (format name, {"system": str|None, "messages": [...]}). Raises BadRecord.
    System turns at the start become the system prompt."""
    if not isinstance(rec, dict):
        raise BadRecord("not an object", type(rec).__name__)
    rec = {k: v for k, v in rec.items() if v is not None}  # parquet gives every row every column, null if absent
    system = _str(rec.get("system"), "system") or None
    if "messages" in rec:
        fmt = "openai"
        msgs = _turns(rec["messages"], "role", "content", {r: r for r in ("system", "user", "assistant")},
                      "messages")
    elif "conversations" in rec:
        fmt = "sharegpt"
        items = rec["conversations"]
        keys = ("role", "content") if items and isinstance(items[0], dict) and "from" not in items[0] \
            else ("from", "value")
        msgs = _turns(items, keys[0], keys[1], SHAREGPT_ROLES, "conversations")
    elif "instruction" in rec and ("output" in rec or "response" in rec):
        fmt = "alpaca" if ("input" in rec or "history" in rec) else "belle"
        msgs = []
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise BadRecord("bad history", "not a list")
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise BadRecord("bad history", "an item is not a [question, answer] pair")
            msgs += [{"role": "user", "content": _str(pair[0], "history question")},
                     {"role": "assistant", "content": _str(pair[1], "history answer")}]
        instruction = _str(rec["instruction"], "instruction")
        extra = _str(rec.get("input"), "input")
        question = f"{instruction}\n{extra}" if instruction.strip() and extra.strip() else (instruction + extra)
        answer = _str(rec.get("output", rec.get("response")), "output")
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    else:
        raise BadRecord("unknown format", "keys: " + ", ".join(list(rec)[:6]))
    while msgs and msgs[0]["role"] == "system":
        first = msgs.pop(0)["content"]
        system = f"{system}\n{first}" if system else first
    return fmt, {"system": system or None, "messages": msgs}


def check_conversation(conv):
    """None if the conversation is usable, else the filter reason."""
    msgs = conv["messages"]
    if not msgs:
        return "no turns"
    if any(not m["content"].strip() for m in msgs):
        return "empty turn"
    for i, m in enumerate(msgs):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return "turns do not alternate user/assistant"
    if msgs[-1]["role"] != "assistant":
        return "does not end with an assistant turn"
    return None


# ---- reading ----------------------------------------------------------------------------------------------

def iter_raw_records(path, errors):
    """Yields (line, record) of one file; malformed JSON is reported to errors (a ReadErrors)."""
    name = str(path).lower().removesuffix(".gz")
    opener = (lambda mode: gzip.open(path, mode + "t" if mode == "r" else mode, encoding="utf-8-sig")) \
        if str(path).endswith(".gz") else (lambda mode: open(path, mode, encoding="utf-8-sig"))
    errors.files_read += 1
    if name.endswith((".jsonl", ".ndjson")):
        with opener("r") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    errors.add(path, lineno, "bad json", f"{e.msg} at column {e.colno}")
    elif name.endswith(".json"):
        with opener("r") as f:
            stream = _JsonStream(f)
            try:
                yield from stream
            except _JsonStreamError as e:
                errors.add(path, e.line, "bad json", e.msg + "; rest of file not read")
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    else:
        raise SystemExit(f"{path}: unsupported file type (want .json, .jsonl or .parquet)")


def read_conversations(path, errors, formats):
    """Unified conversations of one file (unfiltered); counts formats in the Counter `formats`."""
    source = os.path.basename(str(path))
    for line, rec in iter_raw_records(path, errors):
        try:
            fmt, conv = parse_record(rec)
        except BadRecord as e:
            errors.add(path, line, e.reason, e.detail)
            continue
        formats[fmt] += 1
        conv["source"] = source
        conv["line"] = line
        yield conv


# ---- filters ----------------------------------------------------------------------------------------------

def conversation_length(tok, conv):
    from tokenizer.chat_template import encode_conversation
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
    blob = json.dumps([conv["system"], conv["messages"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


class Filter:
    """Applies the filters in order, counting each reason."""

    def __init__(self, tok=None, limit=0, mode="drop", dedup=True):
        self.tok, self.limit, self.mode, self.dedup = tok, limit, mode, dedup
        self.counts = Counter()
        self.seen = set()

    def __call__(self, conv):
        reason = check_conversation(conv)
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


# ---- the demo set from chinese-poetry ---------------------------------------------------------------------

CLAUSE_SPLIT = re.compile(r"[，。？！；、,.?!;]")
DEMO_SYSTEM = "你是一位熟读古典诗词的助手。"


def poem_lines(doc):
    """The body lines of a chinese-poetry document (its title and author lines removed)."""
    lines = doc["text"].split("\n")
    if doc.get("title") and lines and lines[0] == doc["title"]:
        lines = lines[1:]
    if doc.get("author") and lines and lines[0] == doc["author"]:
        lines = lines[1:]
    return [line for line in lines if line.strip()]


def is_regular_poem(lines):
    """A 5- or 7-character 绝句/律诗-like poem: 4 or 8 clauses of equal length, each line ending with
    sentence punctuation."""
    if not lines:
        return False
    clauses = []
    for line in lines:
        if line[-1] not in "。？！":
            return False
        clauses += [c for c in CLAUSE_SPLIT.split(line) if c]
    return len(clauses) in (4, 8) and len({len(c) for c in clauses}) == 1 and len(clauses[0]) in (5, 7)


def build_poetry_demo(path, max_poems, eval_poems, seed, errors):
    """Conversations from the corpus' metadata, train and held-out, plus evaluation questions:
      请写一首题为《X》的诗。 -> the poem;  《X》的作者是谁？ -> 《X》的作者是Y。 (titles with one author only);
      续写：first line -> the other lines;  two-turn: write the poem, then 这首诗的作者是谁？
    Held-out poems appear in no training conversation."""
    docs, title_authors = [], {}
    for doc in iter_documents([path], errors=errors):
        title, author = doc.get("title"), doc.get("author")
        if not title or not author or len(title) > 12:
            continue
        lines = poem_lines(doc)
        if not is_regular_poem(lines):
            continue
        title_authors.setdefault(title, set()).add(author)
        docs.append({"title": title, "author": author, "lines": lines})
    # one poem per title (a title written by several authors would make the author question ambiguous)
    by_title = {}
    for d in docs:
        by_title.setdefault(d["title"], d)
    unique = [d for t, d in sorted(by_title.items()) if len(title_authors[t]) == 1]
    rng = random.Random(seed)
    rng.shuffle(unique)
    chosen = unique[:max_poems]
    held, train = chosen[:eval_poems], chosen[eval_poems:]

    def convs(d, k):
        t, a, body = d["title"], d["author"], "\n".join(d["lines"])
        q_poem, q_author = f"请写一首题为《{t}》的诗。", f"《{t}》的作者是谁？"
        a_author = f"《{t}》的作者是{a}。"
        one = lambda q, ans, sys=None: {"system": sys, "messages": [{"role": "user", "content": q},
                                                                     {"role": "assistant", "content": ans}]}
        out = [one(q_poem, body), one(q_author, a_author, DEMO_SYSTEM if k % 4 == 0 else None)]
        if len(d["lines"]) >= 2:
            out.append(one(f"续写：{d['lines'][0]}", "\n".join(d["lines"][1:])))
        if k % 3 == 0:
            out.append({"system": None, "messages": [
                {"role": "user", "content": q_poem}, {"role": "assistant", "content": body},
                {"role": "user", "content": "这首诗的作者是谁？"}, {"role": "assistant", "content": a_author}]})
        for c in out:
            c["source"] = "chinese-poetry-demo"
        return out

    train_convs = [c for k, d in enumerate(train) for c in convs(d, k)]
    val_convs = [c for k, d in enumerate(held) for c in convs(d, k)]
    questions = []
    for d in held:
        questions.append({"kind": "author", "question": f"《{d['title']}》的作者是谁？",
                          "reference": f"《{d['title']}》的作者是{d['author']}。", "author": d["author"]})
        questions.append({"kind": "poem", "question": f"请写一首题为《{d['title']}》的诗。",
                          "reference": "\n".join(d["lines"])})
    return train_convs, val_convs, questions, {"regular poems found": len(docs), "unique titles": len(unique),
                                                "demo poems train": len(train), "demo poems held out": len(held)}


# ---- writing ----------------------------------------------------------------------------------------------

def write_conversations(path, convs, fmt):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = [{"messages": c["messages"], "system": c.get("system"), "source": c.get("source", "")} for c in convs]
    tmp = f"{path}.tmp.{os.getpid()}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    if overlong not in ("drop", "truncate"):
        raise SystemExit(f"overlong must be 'drop' or 'truncate', not {overlong!r}")
    tok = None
    if tokenizer_model:
        from tokenizer import Tokenizer
        tok = Tokenizer(tokenizer_model)
    paths = [p for p in inputs.split(",") if p]
    rs = [float(r) for r in ratios.split(",") if r] or [1.0] * len(paths)
    if len(rs) != len(paths):
        raise SystemExit(f"{len(paths)} inputs but {len(rs)} ratios")
    if not paths and not demo_poetry:
        raise SystemExit("nothing to do: give --inputs=... and/or --demo_poetry=...")
    errors, formats = ReadErrors(), Counter()
    filt = Filter(tok, max_len + 1 if max_len else 0, overlong, dedup)  # max_len + 1 tokens give max_len targets
    per_source, stats = [], {}
    for p in paths:
        parsed = list(read_conversations(p, errors, formats))
        kept = [c for c in map(filt, parsed) if c is not None]
        per_source.append(kept)
        print(f"{p}: {len(parsed):,} conversations parsed, {len(kept):,} kept")
    rng = random.Random(seed)
    convs = mix(per_source, rs, rng)
    rng.shuffle(convs)
    n_val = int(round(val_fraction * len(convs))) if convs else 0
    val, train = convs[:n_val], convs[n_val:]
    if demo_poetry:
        demo_filter = Filter(tok, max_len + 1 if max_len else 0, overlong, dedup)
        corpus_errors = ReadErrors(max_examples=3)  # the corpus reader's own skips, summarised only
        dtrain, dval, questions, demo_stats = build_poetry_demo(demo_poetry, demo_max_poems, demo_eval_poems,
                                                                seed, corpus_errors)
        demo_stats["corpus records skipped by the reader"] = corpus_errors.count
        dtrain = [c for c in map(demo_filter, dtrain) if c is not None]
        dval = [c for c in map(demo_filter, dval) if c is not None]
        train, val = train + dtrain, val + dval
        rng.shuffle(train)
        qpath = os.path.join(out_dir, "eval_questions.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        with open(qpath, "w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
        stats["demo"] = dict(demo_stats, filters=dict(demo_filter.counts))
        print(f"demo set from {demo_poetry}: {demo_stats}; filters {dict(demo_filter.counts)}; "
              f"{len(questions)} evaluation questions -> {qpath}")
    ext = "parquet" if out_format == "parquet" else "jsonl"
    write_conversations(os.path.join(out_dir, f"train.{ext}"), train, out_format)
    write_conversations(os.path.join(out_dir, f"val.{ext}"), val, out_format)
    turns = Counter(len(c["messages"]) // 2 for c in train + val)
    stats.update(formats=dict(formats), filters=dict(filt.counts), malformed=errors.to_dict(),
                 train=len(train), val=len(val), exchanges_per_conversation=dict(sorted(turns.items())),
                 with_system=sum(1 for c in train + val if c.get("system")))
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=1)
    print(f"formats detected: {dict(formats)}")
    print("filters: " + ", ".join(f"{k} {v:,}" for k, v in filt.counts.most_common()))
    print(errors.report())
    print(f"exchanges per conversation: {dict(sorted(turns.items()))}; with a system prompt: {stats['with_system']}")
    print(f"wrote {len(train):,} train and {len(val):,} val conversations to {out_dir}")
    return stats


if __name__ == "__main__":
    apply_overrides(globals())
    main()
