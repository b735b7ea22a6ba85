"""Preference pairs for DPO, read from the common formats into one internal form. Torch-free (dpo.py and
dpo_data_process.py import it).

    {"system": str | None,
     "prompt": [{"role": "user"|"assistant", "content": str}, ...],   # alternating, ends with a user turn
     "chosen": str, "rejected": str,                                   # the two candidate assistant replies
     "kind": str}                                                      # optional label, e.g. "poem/shuffled"

Accepted records (extra keys ignored):
  {"prompt": str | [messages], "chosen": str | [messages] | {turn}, "rejected": ...}
  {"conversations": [{"from", "value"} | {"role", "content"}, ...], "chosen": ..., "rejected": ...}
  {"chosen": [messages], "rejected": [messages]}   (the prompt is the turns both lists share before the reply)
A reply given as messages is its last assistant turn. Records that do not fit ("malformed: <reason>") and pairs of two
identical replies ("identical pair") are skipped and counted (load_preferences)."""
from collections import Counter
import os

from babyllama.atomic import write_jsonl
from babyllama.records import ReadErrors, iter_records, nothing_usable

ROLE_MAP = {"user": "user", "human": "user", "question": "user",
            "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant",
            "model": "assistant", "system": "system"}
IDENTICAL = "identical pair"


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
    """One record -> the internal pair. BadPair (reason = the message) for a record that does not fit."""
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


def load_preferences(paths, errors=None):
    """Pairs from one path, a comma-separated string of them or a list, and a Counter: 'records', 'kept', 'identical
    pair' and 'malformed: <reason>' per reason. Every skipped record also goes to errors (a ReadErrors, created if None)
    as file:line. ValueError naming a file that gives no usable pair; FileNotFoundError, IsADirectoryError or ValueError
    for a path that is not a readable .json, .jsonl or .parquet file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",") if p]
    errors = ReadErrors() if errors is None else errors
    pairs, counts = [], Counter()
    for path in paths:
        # every skip goes through errors.add (the reader's and ours): what it adds for this file are the counts
        before, kept = Counter(errors.by_reason), 0
        for line, rec in iter_records(path, errors):
            try:
                pair = parse_pair(rec)
            except BadPair as e:
                errors.add(str(path), line, str(e))
                continue
            if pair["chosen"].strip() == pair["rejected"].strip():
                errors.add(str(path), line, IDENTICAL)
                continue
            pairs.append(pair)
            kept += 1
        skipped = Counter(errors.by_reason) - before
        counts["records"] += kept + sum(skipped.values())
        counts["kept"] += kept
        for reason, n in skipped.items():
            counts[reason if reason == IDENTICAL else f"malformed: {reason}"] += n
        if not kept:
            raise nothing_usable(path, "preference pair", errors, skipped)
    return pairs, counts


def write_pairs(path, pairs):
    """Pairs as JSONL in the internal form (load_preferences reads it back unchanged), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, pairs)
