"""The form of a regular poem (绝句, 律诗): 4 or 8 clauses of 5 or 7 characters. One rule for picking the demo's poems
(poetry.py), scoring the model's (eval.py) and rewarding them (poetry_rewards.py). Torch-free."""
import re

CLAUSE_MARKS = "，。？！；、,.?!;"  # what ends a clause
LINE_END = "。？！"  # what ends a line of a well-formed poem
CLAUSE_SPLIT = re.compile(f"[{CLAUSE_MARKS}]")
CLAUSE = re.compile(f"[^{CLAUSE_MARKS}]+[{CLAUSE_MARKS}]")  # a clause and the mark that ends it


def well_formed_poem(text):
    """True for a regular 5- or 7-character poem: 4 or 8 clauses (text between the marks of CLAUSE_MARKS) all
    of one length, 5 or 7 characters, and every non-empty line ending with 。？！. text: the poem's lines
    joined with "\\n" (no title or author line)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines or any(line[-1] not in LINE_END for line in lines):
        return False
    clauses = [c for c in CLAUSE_SPLIT.split("".join(lines)) if c]
    return len(clauses) in (4, 8) and len({len(c) for c in clauses}) == 1 and len(clauses[0]) in (5, 7)


def poem_clauses(text):
    """The clauses of a well-formed poem, each with its ending mark, e.g. ["床前明月光，", "疑是地上霜。", ...]; None when not
    well-formed. Stray marks the rule passes over (a doubled "？。") are left out, so the clauses rebuild a clean poem."""
    if not well_formed_poem(text):
        return None
    return CLAUSE.findall("".join(line for line in text.split("\n") if line.strip()))
