"""SFT conversations: downloaded formats parsed into one unified form, and the unified file read back
(load_conversations, what sft.py trains on). Filters, mixing and writing are sft_data_process.py's. Torch-free.

    {"messages": [{"role": "user"|"assistant", "content": str}, ...],   # alternating, user first, assistant last
     "system": str | None, "source": str}                                # source: the file it came from

Input formats, detected per record (parse_record):
  Alpaca   {"instruction", "input", "output", optional "history": [[q, a], ...], optional "system"}
  BELLE    {"instruction", "output"}                       (Alpaca without input)
  ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], optional "system"}
  OpenAI   {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}   (the unified form is one)
  Q&A      {"ask" | "question", "answer", optional "title"}   (a table of questions and answers, e.g. the doctor Q&A
           CSV department,title,ask,answer; the title stands in for an empty question)
  pairs    {"classical", "modern"}   (aligned classical -> modern Chinese sentences, turned into an instruction:
           translation_prompt)
"""
from collections import Counter
import hashlib
import os

from babyllama.records import ReadErrors, iter_records, nothing_usable

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


# a translation pair becomes one of these instructions (picked by a hash of the text, so the same on every run);
# evaluation asks with the first
TRANSLATION_PROMPTS = ("把下面的文言文翻译成现代文：\n{}", "翻译成白话文：{}", "{}\n这句文言文是什么意思？请用现代汉语翻译。",
                       "请将这段古文译为现代汉语：{}")


def translation_prompt(classical, which=None):
    """The instruction asking for classical's modern translation: TRANSLATION_PROMPTS[which], or for which=None the
    one a hash of the text picks (varied phrasings for training, one fixed phrasing for evaluation)."""
    if which is None:
        which = hashlib.blake2b(classical.encode("utf-8"), digest_size=4).digest()[0] % len(TRANSLATION_PROMPTS)
    return TRANSLATION_PROMPTS[which].format(classical)


class BadRecord(Exception):
    """reason: a short category (counted), detail: the specifics (shown in the first examples)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---- parsing ----------------------------------------------------------------------------------------------

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
    """One downloaded record -> (format: 'alpaca', 'belle', 'sharegpt', 'openai', 'qa' or 'pairs', {"system": str|None,
    "messages": [...]}); leading system turns become the system prompt. BadRecord for a record that fits no format."""
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
    elif "answer" in rec and ("ask" in rec or "question" in rec):
        fmt = "qa"
        question = _str(rec.get("ask", rec.get("question")), "ask")
        if not question.strip() or question.strip() == "无":  # the doctor Q&A leaves some asks empty ("无")
            question = _str(rec.get("title"), "title")
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": _str(rec["answer"], "answer")}]
    elif "classical" in rec and "modern" in rec:
        fmt = "pairs"
        msgs = [{"role": "user", "content": translation_prompt(_str(rec["classical"], "classical"))},
                {"role": "assistant", "content": _str(rec["modern"], "modern")}]
    else:
        raise BadRecord("unknown format", "keys: " + ", ".join(list(rec)[:6]))
    while msgs and msgs[0]["role"] == "system":
        first = msgs.pop(0)["content"]
        system = f"{system}\n{first}" if system else first
    return fmt, {"system": system or None, "messages": msgs}


def check_conversation(conv):
    """None if the conversation is usable for training, else the reason it is not (a short category)."""
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

def _parsed_records(path, errors):
    """(line, record, format, conversation) for every record parse_record takes; the others go to errors."""
    for line, rec in iter_records(path, errors):
        try:
            fmt, conv = parse_record(rec)
        except BadRecord as e:
            errors.add(str(path), line, e.reason, e.detail)
            continue
        yield line, rec, fmt, conv


def read_raw_conversations(path, errors, formats):
    """Unified conversations of one downloaded file, unfiltered, with "source" (file name), "line" and "format" (and a
    translation pair's "classical"). Records fitting
    no format go to errors (a ReadErrors) as file:line; formats found are counted in the Counter `formats`."""
    source = os.path.basename(str(path))
    for line, rec, fmt, conv in _parsed_records(path, errors):
        formats[fmt] += 1
        conv.update(source=source, line=line, format=fmt)
        if fmt == "pairs":  # the classical text: the copy baseline of a held-out pair
            conv["classical"] = rec["classical"]
        yield conv


def load_conversations(path, errors=None):
    """The conversations of a unified file (sft_data_process.py's .jsonl or .parquet; any parse_record format reads
    too): a list of {"messages", "system", "source"}. Unusable records (malformed, empty turn, not alternating...) are
    skipped and reported to errors (a ReadErrors, created if None) as file:line. ValueError naming a file with no usable
    conversation; FileNotFoundError, IsADirectoryError or ValueError for an unreadable or unsupported path."""
    errors = ReadErrors() if errors is None else errors
    skipped_before = Counter(errors.by_reason)
    convs = []
    for line, rec, _, conv in _parsed_records(path, errors):
        reason = check_conversation(conv)
        if reason:
            errors.add(str(path), line, reason)
            continue
        source = rec.get("source") if isinstance(rec.get("source"), str) else ""
        convs.append({"messages": conv["messages"], "system": conv["system"], "source": source})
    if not convs:
        raise nothing_usable(path, "conversation", errors, Counter(errors.by_reason) - skipped_before)
    return convs
