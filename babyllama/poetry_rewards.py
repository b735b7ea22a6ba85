"""Verifiable rewards for the poetry demo's RL stage: a prompt asks for a form ("写一首五言绝句，题为《春晓》") and the reply is
scored by rules, no reward model: its form, no repeated clauses, the title, the 平仄 tones (poetry_reward weighs them). A
poem of the right form is also well_formed_poem (poem_form.py). Torch-free."""
from collections import Counter
import glob
import json
import os
import re

from babyllama.atomic import write_json
from babyllama.poem_form import CLAUSE_MARKS, LINE_END, poem_clauses
from babyllama.records import ReadErrors, iter_records

CHARS = {"五言": 5, "七言": 7}
CLAUSES = {"绝句": 4, "律诗": 8}
ASK = "写一首{chars}{kind}，题为《{title}》"
REQUEST = re.compile(r"(五言|七言)(绝句|律诗)[^《]*《([^》]+)》")


def make_request(title, n_chars, n_clauses):
    """The prompt asking for a poem of n_chars characters a clause and n_clauses clauses, titled title."""
    chars = {v: k for k, v in CHARS.items()}[n_chars]
    kind = {v: k for k, v in CLAUSES.items()}[n_clauses]
    return ASK.format(chars=chars, kind=kind, title=title)


def parse_request(prompt):
    """{"chars": 5|7, "clauses": 4|8, "title": str} from a prompt like make_request's; None if it asks no known form."""
    m = REQUEST.search(prompt)
    if not m:
        return None
    return {"chars": CHARS[m.group(1)], "clauses": CLAUSES[m.group(2)], "title": m.group(3)}


def clauses_of(reply):
    """[(text, mark)] of the reply's body: each run of characters and the mark ending it ("" for trailing text).
    Newlines are not clauses; a first line naming the title (《X》 or X alone, without marks) is not body."""
    lines = [line.strip() for line in reply.split("\n") if line.strip()]
    if lines and not any(c in CLAUSE_MARKS for c in lines[0]) and len(lines) > 1:
        lines = lines[1:]  # a title line
    body = "".join(lines)
    return [(m.group(1), m.group(2)) for m in re.finditer(f"([^{CLAUSE_MARKS}]*)([{CLAUSE_MARKS}]|$)", body)
            if m.group(1) or m.group(2)]


def form_score(reply, ask):
    """How close the reply is to the requested form, in [0, 1]: 1.0 for exactly that form as the corpus writes it (two
    clauses a line, "，" then 。？！, the right number of clauses of the right length); else the mean of (clause count
    right, share of clauses of the right length, share of marks right); 0 for an empty reply."""
    clauses = clauses_of(reply)
    if not clauses:
        return 0.0
    n = ask["clauses"]
    count_ok = 1.0 if len(clauses) == n else 0.0
    first = clauses[:n]
    length_ok = sum(len(text) == ask["chars"] for text, _ in first) / n
    marks_ok = sum((mark == "，") if k % 2 == 0 else (mark in LINE_END and mark != "")
                   for k, (_, mark) in enumerate(first)) / n
    return (count_ok + length_ok + marks_ok) / 3


def repeat_score(reply):
    """1 - the share of clauses that repeat an earlier one (1.0 for an empty reply)."""
    texts = [t for t, _ in clauses_of(reply) if t]
    if not texts:
        return 1.0
    return 1.0 - (len(texts) - len(set(texts))) / len(texts)


def title_score(reply, ask):
    """1.0 when the reply names the requested title: 《X》 anywhere, or a first line that is X."""
    first = reply.strip().split("\n")[0].strip()
    return 1.0 if f"《{ask['title']}》" in reply or first == ask["title"] else 0.0


def tone_score(reply, ask, table):
    """The share of the 平仄 checks of a regular poem the reply passes (0 when none can be checked); table: char -> "平" |
    "仄". In a clause the 2nd and 4th characters differ in tone (and the 4th and 6th in 七言), and the 2nd characters of a
    couplet's two clauses differ (对). Only clauses of the requested length count; unknown tones are skipped."""
    clauses = [t for t, _ in clauses_of(reply)][:ask["clauses"]]
    clauses = [c if len(c) == ask["chars"] else None for c in clauses]
    passed = checked = 0

    def differ(a, b):
        nonlocal passed, checked
        ta, tb = table.get(a), table.get(b)
        if ta and tb:
            checked += 1
            passed += ta != tb

    for c in clauses:
        if c:
            differ(c[1], c[3])
            if len(c) == 7:
                differ(c[3], c[5])
    for a, b in zip(clauses[0::2], clauses[1::2]):
        if a and b:
            differ(a[1], b[1])
    return passed / checked if checked else 0.0


def build_tone_table(poetry_root, min_share=0.9):
    """{char: "平" | "仄"} from the chinese-poetry package: each dist/quantangshi poem with a tone pattern in
    dist/strains/json (same id), line by line where line and pattern have one length; a character enters with the tone
    it has in at least min_share of its occurrences."""
    patterns = {}
    for path in glob.glob(os.path.join(poetry_root, "dist", "strains", "json", "*.json")):
        with open(path, encoding="utf-8") as f:
            for rec in json.load(f):
                patterns[rec["id"]] = rec["strains"]
    counts = {}
    for path in glob.glob(os.path.join(poetry_root, "dist", "quantangshi", "poet.*.json")):
        with open(path, encoding="utf-8") as f:
            for poem in json.load(f):
                for line, pattern in zip(poem.get("paragraphs", []), patterns.get(poem.get("id"), [])):
                    if len(line) == len(pattern):
                        for ch, tone in zip(line, pattern):
                            if tone in ("平", "仄"):
                                counts.setdefault(ch, Counter())[tone] += 1
    table = {}
    for ch, c in counts.items():
        tone, n = c.most_common(1)[0]
        if n / sum(c.values()) >= min_share:
            table[ch] = tone
    return table


def load_tone_table(path, poetry_root):
    """The tone table in the JSON file at path; if missing, built from poetry_root and written there first (atomically:
    processes building it at once write the same table). ValueError naming a poetry_root without tone patterns."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    table = build_tone_table(poetry_root)
    if not table:
        raise ValueError(f"{poetry_root}: no tone patterns found to build {path} from (want the chinese-poetry "
                         f"package with dist/strains)")
    write_json(path, table)
    print(f"tone table: {len(table):,} characters ({sum(t == '平' for t in table.values()):,} 平) from "
          f"{poetry_root} -> {path}")
    return table


def poetry_reward(prompt, reply, w_form=1.0, w_repeat=0.5, w_title=0.0, w_tone=0.0, tones=None):
    """The reward of a reply to a poetry request: w_form * form + w_repeat * no-repeats + w_title * title + w_tone *
    tones (tones: build_tone_table's, needed when w_tone > 0). 0 for a prompt asking no known form."""
    ask = parse_request(prompt)
    if ask is None:
        return 0.0
    r = w_form * form_score(reply, ask) + w_repeat * repeat_score(reply) + w_title * title_score(reply, ask)
    if w_tone:
        r += w_tone * tone_score(reply, ask, tones or {})
    return r


def exact_form(prompt, reply):
    """True when the reply is exactly the requested form (what the demo reports as "correct form")."""
    ask = parse_request(prompt)
    return ask is not None and form_score(reply, ask) == 1.0


def exact_form_share(prompts, replies):
    """The share of the replies (each to the prompt beside it) of exactly the requested form."""
    return sum(exact_form(q, a) for q, a in zip(prompts, replies)) / len(replies)


def requests_from(path, limit=0):
    """Form requests (make_request) for the poems of a file (.jsonl, .json, .parquet: babyllama/records.py): SFT
    conversations (user "请写一首题为《X》的诗。" answered by a poem) or the demo's held-out questions ({"kind": "poem",
    "question", "reference"}), asking the real poem's form (others left out). One per title, in file order; at most
    limit (0 = all). Returns (requests, skipped: the records that are not JSON objects or could not be read)."""
    title_of = re.compile(r"请写一首题为《([^》]+)》的诗。")
    out, seen, errors = [], set(), ReadErrors()
    for line, rec in iter_records(path, errors):
        if not isinstance(rec, dict):
            errors.add(path, line, "not a JSON object")
            continue
        pairs = []
        if rec.get("kind") == "poem" and isinstance(rec.get("question"), str):
            pairs.append((rec["question"], rec.get("reference", "")))
        msgs = rec.get("messages") or []
        for q, a in zip(msgs, msgs[1:]):
            if isinstance(q, dict) and isinstance(a, dict) and q.get("role") == "user" and a.get("role") == "assistant":
                pairs.append((q.get("content", ""), a.get("content", "")))
        for question, poem in pairs:
            m = title_of.fullmatch(question or "")
            clauses = poem_clauses(poem or "") if m else None
            if not clauses or m.group(1) in seen:
                continue
            seen.add(m.group(1))
            out.append(make_request(m.group(1), len(clauses[0]) - 1, len(clauses)))
            if limit and len(out) >= limit:
                return out, errors.count
    return out, errors.count
