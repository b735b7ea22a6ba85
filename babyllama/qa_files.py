"""Question files for generation evals (eval.py --mode=chat and --mode=gen), read with every skipped line named
(file:line) and no question at all an error naming the file."""
from babyllama.readers import read_txt
from babyllama.records import ReadErrors, iter_records


def kept(path, items, errors, none_left):
    """The items read from path, after printing what was skipped; none at all is an error naming the file."""
    if errors.count:
        print(errors.report())
    if not items:
        raise SystemExit(f"{path}: {none_left} ({errors.count} lines skipped)")
    return items


def read_questions(path):
    """The questions of a .txt file (one per line) or a .jsonl file ({"question", optional "system", "reference",
    "kind", "baselines": {name: answer}}). Lines not UTF-8, not JSON, without a "question" string or with baselines
    that are not strings are skipped and named (file:line)."""
    errors = ReadErrors()
    if path.endswith(".jsonl"):
        items = []
        for line, rec in iter_records(path, errors):
            if not (isinstance(rec, dict) and isinstance(rec.get("question"), str) and rec["question"].strip()):
                errors.add(path, line, "no question", 'want {"question": "..."}')
            elif not (isinstance(rec.get("baselines", {}), dict) and
                      all(isinstance(v, str) for v in rec.get("baselines", {}).values())):
                errors.add(path, line, "bad baselines", 'want {"baselines": {"name": "answer", ...}}')
            else:
                items.append(rec)
    else:
        items = [{"question": d["text"]} for d in read_txt(path, path, errors)]
    return kept(path, items, errors, "no question to answer")


def messages_ok(msgs):
    """True for a conversation to answer: an optional system message, then user/assistant turns alternating from a user
    turn to a final user turn, all contents strings."""
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        return False
    roles = [m.get("role") for m in msgs]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return bool(roles) and len(roles) % 2 == 1 and all(r == ("user" if i % 2 == 0 else "assistant")
                                                         for i, r in enumerate(roles))


def read_gen_items(path):
    """The items of a gen file: JSONL {"prompt": str | "messages": [{"role", "content"}], "reference": str}, each with
    its "line". Lines without a prompt or a reference string are skipped and named (file:line)."""
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
