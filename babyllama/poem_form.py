"""The form of a regular poem (绝句, 律诗): 4 or 8 clauses of 5 or 7 characters. One rule, used to pick the demo's
poems (babyllama/poetry.py), to score the model's (eval.py's chat scores) and to reward them (poetry_rewards.py).
Torch-free."""
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
    """The clauses of a well-formed poem (well_formed_poem), each with the mark that ends it, in order, e.g.
    ["床前明月光，", "疑是地上霜。", ...]; None when the poem is not well-formed. A stray mark the rule passes
    over (a doubled "？。", a line that is only "。") is left out, so the clauses rebuild a clean poem."""
    if not well_formed_poem(text):
        return None
    return CLAUSE.findall("".join(line for line in text.split("\n") if line.strip()))
