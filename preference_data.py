"""
Preference pairs for DPO, read from the common formats into one internal form, plus the demo preference set
built from the chinese-poetry corpus. Torch-free (dpo.py and dpo_data.py import it).

The internal form of one pair:

    {"system": str | None,
     "prompt": [{"role": "user"|"assistant", "content": str}, ...],   # alternating, ends with a user turn
     "chosen": str, "rejected": str}                                   # the two candidate assistant replies

Accepted records (JSON list, JSONL or parquet; extra keys are ignored):
  {"prompt": str | [messages], "chosen": str | [messages] | {turn}, "rejected": ...}
  {"conversations": [{"from", "value"} | {"role", "content"}, ...], "chosen": ..., "rejected": ...}
  {"chosen": [messages], "rejected": [messages]}   (the prompt is the turns both lists share before the reply)
A reply given as messages is its last assistant turn; as a single turn, {from, value} or {role, content}.
Records that do not fit are counted by reason and skipped ("malformed"), as are pairs whose two replies are
the same text ("identical pair"). load_preferences returns the pairs and these counts.
"""
import json
import os
import random
import re
from collections import Counter

ROLE_MAP = {"user": "user", "human": "user", "question": "user",
            "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant",
            "model": "assistant", "system": "system"}


class BadPair(Exception):
    """A record that cannot become a pair; str(e) is the counted reason."""


def _turn(m, what):
    if not isinstance(m, dict):
        raise BadPair(f"{what}: turn not an object")
    if "from" in m or "value" in m:
        role, content = m.get("from"), m.get("value")
    else:
        role, content = m.get("role"), m.get("content")
    role = ROLE_MAP.get(str(role).lower()) if role is not None else None
    if role is None:
        raise BadPair(f"{what}: unknown or missing role")
    if not isinstance(content, str):
        raise BadPair(f"{what}: content not a string")
    return {"role": role, "content": content}


def _turns(items, what):
    if not isinstance(items, list):
        raise BadPair(f"{what}: not a list")
    return [_turn(m, what) for m in items]


def _reply(value, what):
    """A reply field -> (turns before the reply, reply text)."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    turns = _turns(value, what)
    if not turns or turns[-1]["role"] != "assistant":
        raise BadPair(f"{what}: does not end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def parse_pair(rec):
    """One record -> the internal pair. Raises BadPair (reason = the message) for records that do not fit."""
    if not isinstance(rec, dict):
        raise BadPair("record not an object")
    rec = {k: v for k, v in rec.items() if v is not None}  # parquet rows carry every column, null if absent
    if "chosen" not in rec or "rejected" not in rec:
        raise BadPair("no chosen/rejected")
    c_pre, chosen = _reply(rec["chosen"], "chosen")
    r_pre, rejected = _reply(rec["rejected"], "rejected")
    if "prompt" in rec:
        prompt = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) \
            else _turns(rec["prompt"], "prompt")
    elif "conversations" in rec:
        prompt = _turns(rec["conversations"], "conversations")
    else:
        prompt = []
    # a reply given with its conversation (implicit prompt): both must carry the same one
    if c_pre or r_pre:
        if c_pre != r_pre:
            raise BadPair("chosen and rejected have different prompts")
        prompt = prompt + c_pre if prompt != c_pre else prompt
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    while prompt and prompt[0]["role"] == "system":
        first = prompt.pop(0)["content"]
        system = f"{system}\n{first}" if system else first
    if not prompt:
        raise BadPair("no prompt")
    for i, m in enumerate(prompt):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadPair("prompt turns do not alternate user/assistant")
        if not m["content"].strip():
            raise BadPair("empty prompt turn")
    if prompt[-1]["role"] != "user":
        raise BadPair("prompt does not end with a user turn")
    if not chosen.strip() or not rejected.strip():
        raise BadPair("empty reply")
    pair = {"system": system or None, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if isinstance(rec.get("kind"), str):  # the demo set labels its pairs (poem/author/continue)
        pair["kind"] = rec["kind"]
    return pair


def iter_records(path, counts):
    """Raw records of a .json (a list, or one object), .jsonl or .parquet file; bad JSON lines are counted."""
    name = str(path).lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif name.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    counts["malformed: bad json"] += 1
    elif name.endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
        yield from (data if isinstance(data, list) else [data])
    else:
        raise ValueError(f"{path}: unsupported file type (want .json, .jsonl or .parquet)")


def load_preferences(paths):
    """Pairs from one path or a list/comma-separated string of them, and a Counter: 'records', 'kept',
    'identical pair' and 'malformed: <reason>' for each reason."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    pairs, counts = [], Counter()
    for path in paths:
        for rec in iter_records(path, counts):
            counts["records"] += 1
            try:
                pair = parse_pair(rec)
            except BadPair as e:
                counts[f"malformed: {e}"] += 1
                continue
            if pair["chosen"].strip() == pair["rejected"].strip():
                counts["identical pair"] += 1
                continue
            counts["kept"] += 1
            pairs.append(pair)
    counts["records"] += counts["malformed: bad json"]
    return pairs, counts


def write_pairs(path, pairs):
    """Pairs as JSONL in the internal form (which load_preferences reads back unchanged)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- the demo preference set from the chinese-poetry corpus ------------------------------------------------

CLAUSE = re.compile(r"[^，。？！；]+[，。？！；]")


def poem_clauses(doc):
    """The clauses (with their punctuation) of a regular 5/7-character poem of 4 or 8 clauses, else None."""
    lines = [l for l in doc["text"].split("\n") if l.strip()]
    for meta in ("title", "author"):  # the readers put title and author lines before the body
        if lines and doc.get(meta) and lines[0] == doc[meta]:
            lines = lines[1:]
    body = "".join(lines)
    clauses = CLAUSE.findall(body)
    if "".join(clauses) != body or len(clauses) not in (4, 8):
        return None
    sizes = {len(c) - 1 for c in clauses}
    if len(sizes) != 1 or sizes.pop() not in (5, 7):
        return None
    return clauses


def lines_of(clauses):
    """Two clauses a line, as the corpus (and the SFT demo set) writes regular poems."""
    return ["".join(clauses[i:i + 2]) for i in range(0, len(clauses), 2)]


def corrupt(clauses, kind, rng, skip=0):
    """A plausible-looking but wrong poem: 'shuffled' clause order, 'truncated' to half, or the first
    line 'repeated'. Punctuation is re-set so only the content gives it away. With skip=2 (a continuation
    after the first line): the rest shuffled, cut to half, or the first line repeated in its place."""
    if skip:
        rest = clauses[skip:]
        if kind == "repeated":
            return "\n".join(lines_of(clauses[:2] * (len(rest) // 2)))
        return corrupt(rest, kind, rng)
    if kind == "shuffled":
        order = list(range(len(clauses)))
        while order == sorted(order):
            rng.shuffle(order)
        texts = [clauses[i][:-1] for i in order]
        out = [t + ("，" if k % 2 == 0 else "。") for k, t in enumerate(texts)]
    elif kind == "truncated":
        out = clauses[:max(2, len(clauses) // 4 * 2)]  # whole lines: 8 clauses -> 4, 4 or 6 -> 2
    elif kind == "repeated":
        out = clauses[:2] * (len(clauses) // 2)
    else:
        raise ValueError(kind)
    return "\n".join(lines_of(out))


def build_poetry_pairs(paths, n_poems=2000, n_val=100, seed=0, max_docs=0):
    """(train pairs, held-out pairs, stats) from chinese-poetry files (any path clean_data.readers reads).
    Per poem: the poem asked by title (chosen the real one, rejected a corrupted one), its author (rejected
    a wrong author), and the continuation of its first line (rejected a corrupted continuation). The held-out
    pairs come from poems that appear in no training pair. Prompts are those of the SFT demo set."""
    from clean_data.readers import iter_documents
    poems, seen, n_docs = [], set(), 0
    for doc in iter_documents(paths):
        n_docs += 1
        if max_docs and n_docs > max_docs:
            break
        title, author = doc.get("title"), doc.get("author")
        if not title or not author or len(title) > 12 or title in seen:
            continue
        clauses = poem_clauses(doc)
        if clauses is None:
            continue
        seen.add(title)
        poems.append({"title": title, "author": author, "clauses": clauses})
    rng = random.Random(seed)
    rng.shuffle(poems)
    poems = poems[:n_poems]
    authors = sorted({p["author"] for p in poems})
    if len(authors) < 2:
        raise ValueError("need poems by at least two authors")

    def pairs_of(p, k):
        t, a, cl = p["title"], p["author"], p["clauses"]
        body = "\n".join(lines_of(cl))
        kind = ("shuffled", "truncated", "repeated")[k % 3]
        wrong = a
        while wrong == a:
            wrong = rng.choice(authors)
        user = lambda q: [{"role": "user", "content": q}]
        first, rest = lines_of(cl)[0], "\n".join(lines_of(cl)[1:])
        rest_bad = corrupt(cl, kind, rng, skip=2) if len(cl) > 4 or kind != "truncated" \
            else corrupt(cl, "repeated", rng, skip=2)
        out = [
            {"system": None, "prompt": user(f"请写一首题为《{t}》的诗。"), "chosen": body,
             "rejected": corrupt(cl, kind, rng), "kind": f"poem/{kind}"},
            {"system": None, "prompt": user(f"《{t}》的作者是谁？"), "chosen": f"《{t}》的作者是{a}。",
             "rejected": f"《{t}》的作者是{wrong}。", "kind": "author"},
        ]
        if rest and rest_bad and rest != rest_bad:
            out.append({"system": None, "prompt": user(f"续写：{first}"), "chosen": rest, "rejected": rest_bad,
                        "kind": "continue"})
        return out

    val = [x for k, p in enumerate(poems[:n_val]) for x in pairs_of(p, k)]
    train = [x for k, p in enumerate(poems[n_val:]) for x in pairs_of(p, k)]
    rng.shuffle(train)
    stats = {"documents read": n_docs, "regular poems": len(seen), "poems used": len(poems),
             "held-out poems": min(n_val, len(poems)), "train pairs": len(train), "held-out pairs": len(val),
             "kinds": dict(Counter(x["kind"] for x in train))}
    return train, val, stats
