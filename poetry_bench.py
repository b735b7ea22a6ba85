"""
A multiple-choice benchmark a small model trained here can pass, written in the C-Eval layout from the held-out
documents of a poetry corpus, so `eval.py --mode=mc` scores it like C-Eval. C-Eval and CMMLU sit at chance
(25%) for models under 1B parameters; these two subjects ask what a model of poetry learns first. Torch-free.

  next_line  the lines of a poem up to some line, and four candidates for the line after it: the true one and
             three lines with the same number of characters taken from other held-out poems.
  author     a poem (title and lines) and four poets: its author and three authors of other held-out poems.

--kind=prose asks the same of modern text (make demo-zh): next_sentence gives up to three sentences of a held-out
document and four candidates for the sentence after them, the true one and three sentences with the same number of
characters from other held-out documents.

Only documents in data_process.py's validation split are used (its per-document rule, babyllama.split.is_val, with
the val_fraction and seed recorded in the token data's meta.json), so no question's poem was a training
document; the answer letters are drawn uniformly, so chance is 25%. `dev` holds the shots for k-shot prompts,
from other held-out poems than `val`.

    python poetry_bench.py --corpus=out/demo/clean/clean.parquet --token_meta=out/demo/data/meta.json \\
        --out_dir=out/demo/poetry_bench
    python poetry_bench.py --kind=prose --corpus=out/zh/clean/clean.parquet --token_meta=out/zh/data/meta.json \
        --out_dir=out/zh/cloze
"""
import csv
import json
import os
import random
import re

import pyarrow.parquet as pq

from babyllama.atomic import atomic_open, write_json
from babyllama.configurator import run_main
from babyllama.poetry import poem_lines
from babyllama.split import is_val

# -----------------------------------------------------------------------------------------------------------
corpus = "out/demo/clean/clean.parquet"  # clean_data's parquet that data_process.py read (text, title, author)
token_meta = "out/demo/data/meta.json"  # data_process.py's meta.json: the split rule's val_fraction and seed
out_dir = "out/demo/poetry_bench"
kind = "poetry"  # 'poetry' (next_line, author) or 'prose' (next_sentence)
n_val = 500  # questions per subject in val
n_dev = 5  # questions per subject in dev (the shots)
max_line_chars = 16  # poems with a longer line (prose, long ci) are left out
seed = 0
# -----------------------------------------------------------------------------------------------------------

SUBJECTS = {"next_line": {"name": "古诗下一句", "categories": ["poetry"]},
            "author": {"name": "古诗作者", "categories": ["poetry"]}}  # babyllama/mc.py's subject map, per benchmark
ASK_NEXT = "《{title}》\n{lines}"
ASK_AUTHOR = "《{title}》\n{lines}\n这首诗的作者是谁？"
PROSE_SUBJECTS = {"next_sentence": {"name": "现代文下一句", "categories": ["modern Chinese"]}}
SENTENCE = re.compile(r"[^。！？!?\n]+[。！？!?]+[”’」』]?")  # a sentence with its closing marks
PASSAGE = 4  # sentences per prose question: up to three shown, the fourth (or an earlier one) asked for
MIN_SENTENCE, MAX_SENTENCE = 8, 40  # characters: long enough to tell apart, short enough that four fit the context


def parquet_documents(path):
    """The documents of a cleaned parquet (clean_data's output) with their title and author columns."""
    f = pq.ParquetFile(path)
    missing = {"text", "title", "author"} - set(f.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (want clean_data's parquet of a poetry "
                         f"corpus: text, title, author)")
    for batch in f.iter_batches(columns=["text", "title", "author"], batch_size=8192):
        yield from batch.to_pylist()


def held_out_poems(docs, val_fraction, split_seed, max_chars):
    """The documents data_process.py puts in val (babyllama.split.is_val on their text) that have a title, an
    author and 2 or more lines of at most max_chars characters: [{"title", "author", "lines"}]."""
    out = []
    for d in docs:
        if not is_val(d["text"], val_fraction, split_seed) or not d.get("title") or not d.get("author"):
            continue
        if len(d["author"]) > 6 or "《" in d["author"]:  # a play's author with its title (yuanqu), not a name
            continue
        lines = poem_lines(d)
        if len(lines) >= 2 and all(len(line) <= max_chars for line in lines):
            out.append({"title": d["title"], "author": d["author"], "lines": lines})
    return out


def held_out_passages(docs, val_fraction, split_seed):
    """The first PASSAGE consecutive sentences of MIN_SENTENCE..MAX_SENTENCE characters of every document
    data_process.py puts in val (babyllama.split.is_val on its text): [{"title": "", "lines": sentences}]."""
    out = []
    for d in docs:
        if not is_val(d["text"], val_fraction, split_seed):
            continue
        run = []
        for s in (m.group(0).strip() for m in SENTENCE.finditer(d["text"])):
            run = run + [s] if MIN_SENTENCE <= len(s) <= MAX_SENTENCE else []
            if len(run) == PASSAGE:
                out.append({"title": "", "lines": run})
                break
    return out


def _options(answer, pool, rng):
    """Four options: the answer and three distinct others from pool, shuffled; (options, letter)."""
    others = rng.sample(sorted(set(pool) - {answer}), 3)
    opts = others + [answer]
    rng.shuffle(opts)
    return opts, "ABCD"[opts.index(answer)]


def next_line_question(poem, lines_by_len, rng):
    """A next_line question from a poem, or None when no line has three same-length lines elsewhere."""
    ks = [k for k in range(1, len(poem["lines"])) if len(lines_by_len.get(len(poem["lines"][k]), ())) >= 4]
    if not ks:
        return None
    k = rng.choice(ks)
    answer = poem["lines"][k]
    pool = [line for line in lines_by_len[len(answer)] if line not in poem["lines"]]
    if len(set(pool)) < 3:
        return None
    opts, letter = _options(answer, pool, rng)
    shown = ASK_NEXT.format(title=poem["title"], lines="\n".join(poem["lines"][:k])) if poem["title"] \
        else "".join(poem["lines"][:k])  # prose: the sentences as they run
    return {"question": shown, "options": opts, "answer": letter}


def author_question(poem, authors, rng):
    opts, letter = _options(poem["author"], authors, rng)
    return {"question": ASK_AUTHOR.format(title=poem["title"], lines="\n".join(poem["lines"])),
            "options": opts, "answer": letter}


def build(poems, n_val, n_dev, rng, subjects=SUBJECTS):
    """{subject: {"val": [...], "dev": [...]}}: each poem (or prose passage) asks at most one question per subject;
    dev and val come from different poems. Distractor lines and authors come from the other held-out poems."""
    lines_by_len = {}
    for p in poems:
        for line in p["lines"]:
            lines_by_len.setdefault(len(line), set()).add(line)
    lines_by_len = {n: sorted(v) for n, v in lines_by_len.items()}
    authors = sorted({p["author"] for p in poems if p.get("author")})
    if subjects is SUBJECTS and len(authors) < 4:
        raise ValueError(f"{len(poems)} held-out poems have {len(authors)} authors; 4 or more are needed")
    out = {}
    for subject in subjects:
        order = list(range(len(poems)))
        rng.shuffle(order)
        qs = []
        for i in order:
            q = author_question(poems[i], authors, rng) if subject == "author" \
                else next_line_question(poems[i], lines_by_len, rng)
            if q:
                qs.append(q)
            if len(qs) == n_dev + n_val:
                break
        if len(qs) <= n_dev:
            raise ValueError(f"only {len(qs)} {subject} questions from {len(poems)} held-out poems")
        out[subject] = {"dev": qs[:n_dev], "val": qs[n_dev:]}
    return out


def write_csv(path, questions):
    """The C-Eval layout: id,question,A,B,C,D,answer (csv quoting for the newlines inside questions)."""
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i, q in enumerate(questions):
            w.writerow([i, q["question"], *q["options"], q["answer"]])


def main():
    with open(token_meta, encoding="utf-8") as f:
        meta = json.load(f)
    if "val_fraction" not in meta or "seed" not in meta:
        raise ValueError(f"{token_meta}: no val_fraction/seed (want the meta.json data_process.py writes)")
    if kind not in ("poetry", "prose"):
        raise SystemExit(f"kind must be 'poetry' or 'prose', not {kind!r}")
    if kind == "prose":
        subjects = PROSE_SUBJECTS
        poems = held_out_passages(parquet_documents(corpus), meta["val_fraction"], meta["seed"])
        print(f"{len(poems)} held-out documents with {PASSAGE} sentences in a row of {MIN_SENTENCE}-{MAX_SENTENCE} "
              f"characters in {corpus}")
    else:
        subjects = SUBJECTS
        poems = held_out_poems(parquet_documents(corpus), meta["val_fraction"], meta["seed"], max_line_chars)
        print(f"{len(poems)} held-out poems with a title, an author and short lines in {corpus}")
    sets = build(poems, n_val, n_dev, random.Random(seed), subjects)
    for subject, parts in sets.items():
        for split, qs in parts.items():
            write_csv(os.path.join(out_dir, split, f"{subject}_{split}.csv"), qs)
        counts = {L: sum(q["answer"] == L for q in parts["val"]) for L in "ABCD"}
        print(f"{subject}: {len(parts['val'])} val and {len(parts['dev'])} dev questions; answers {counts}")
    write_json(os.path.join(out_dir, "subjects.json"), subjects)
    write_json(os.path.join(out_dir, "about.json"), {
        "what": f"multiple choice from held-out {'poems' if kind == 'poetry' else 'documents'} (data_process.py's "
                f"val split), C-Eval layout",
        "corpus": corpus, "token_meta": token_meta, "split_rule": meta.get("split_rule"),
        "held_out_documents": len(poems), "seed": seed, "chance": 0.25,
        "questions": {s: {k: len(v) for k, v in p.items()} for s, p in sets.items()}})
    print(f"-> {out_dir}/val, {out_dir}/dev (score with: python eval.py --mode=mc --mc_data={out_dir})")


if __name__ == "__main__":
    run_main(globals(), main)
