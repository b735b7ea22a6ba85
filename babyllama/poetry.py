"""The demo chat data built from the chinese-poetry corpus' own metadata (titles, authors, lines), so the demo needs no
other download: SFT conversations and held-out questions (build_poetry_demo) and DPO pairs (build_poetry_pairs). Its
poems are the well-formed ones (poem_form.py). Both sets ask with the same prompts (ASK_POEM, ASK_AUTHOR, ASK_CONTINUE),
so a model tuned on one is asked what it knows by the other. Torch-free."""
from collections import Counter
import random

from babyllama.poem_form import poem_clauses, well_formed_poem
from babyllama.readers import iter_documents
from babyllama.records import ReadErrors

DEMO_SYSTEM = "你是一位熟读古典诗词的助手。"
ASK_POEM = "请写一首题为《{title}》的诗。"
ASK_AUTHOR = "《{title}》的作者是谁？"
TELL_AUTHOR = "《{title}》的作者是{author}。"
ASK_CONTINUE = "续写：{line}"
ASK_AUTHOR_AFTER = "这首诗的作者是谁？"  # the second turn, after the poem


def poem_lines(doc):
    """A chinese-poetry document's body lines: its leading title and author lines and empty lines removed."""
    lines = doc["text"].split("\n")
    if doc.get("title") and lines and lines[0] == doc["title"]:
        lines = lines[1:]
    if doc.get("author") and lines and lines[0] == doc["author"]:
        lines = lines[1:]
    return [line for line in lines if line.strip()]


def lines_of(clauses):
    """Two clauses a line, as the corpus (and the SFT demo set) writes regular poems."""
    return ["".join(clauses[i:i + 2]) for i in range(0, len(clauses), 2)]


def _one_turn(question, answer, system=None):
    return {"system": system, "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}


# ---- the SFT demo set -----------------------------------------------------------------------------------------

def build_poetry_demo(path, max_poems, eval_poems, seed, errors):
    """Conversations from the corpus' metadata, train and held-out, plus evaluation questions:
      请写一首题为《X》的诗。 -> the poem;  《X》的作者是谁？ -> 《X》的作者是Y。 (titles with one author only);
      续写：first line -> the other lines;  two-turn: write the poem, then 这首诗的作者是谁？
    path: anything readers.iter_documents reads; errors: the ReadErrors for its skips. Of the well-formed poems with an
    author and a title of at most 12 characters, one per title, max_poems are picked with seed and the first eval_poems
    held out of every training conversation. Returns (train conversations, held-out conversations, questions, stats)."""
    docs, title_authors = [], {}
    for doc in iter_documents([path], errors=errors):
        title, author = doc.get("title"), doc.get("author")
        if not title or not author or len(title) > 12:
            continue
        lines = poem_lines(doc)
        if not well_formed_poem("\n".join(lines)):
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
        q_poem, q_author = ASK_POEM.format(title=t), ASK_AUTHOR.format(title=t)
        a_author = TELL_AUTHOR.format(title=t, author=a)
        out = [_one_turn(q_poem, body), _one_turn(q_author, a_author, DEMO_SYSTEM if k % 4 == 0 else None)]
        if len(d["lines"]) >= 2:
            out.append(_one_turn(ASK_CONTINUE.format(line=d["lines"][0]), "\n".join(d["lines"][1:])))
        if k % 3 == 0:
            out.append({"system": None, "messages": [
                {"role": "user", "content": q_poem}, {"role": "assistant", "content": body},
                {"role": "user", "content": ASK_AUTHOR_AFTER}, {"role": "assistant", "content": a_author}]})
        for c in out:
            c["source"] = "chinese-poetry-demo"
        return out

    train_convs = [c for k, d in enumerate(train) for c in convs(d, k)]
    val_convs = [c for k, d in enumerate(held) for c in convs(d, k)]
    questions = []
    for d in held:
        questions.append({"kind": "author", "question": ASK_AUTHOR.format(title=d["title"]),
                          "reference": TELL_AUTHOR.format(title=d["title"], author=d["author"]),
                          "author": d["author"]})
        questions.append({"kind": "poem", "question": ASK_POEM.format(title=d["title"]),
                          "reference": "\n".join(d["lines"])})
    return train_convs, val_convs, questions, {"regular poems found": len(docs), "unique titles": len(unique),
                                                "demo poems train": len(train), "demo poems held out": len(held)}


# ---- the DPO demo set -----------------------------------------------------------------------------------------

def corrupt(clauses, kind, rng, skip=0):
    """A plausible but wrong poem: 'shuffled' clause order, 'truncated' to half, or the first line 'repeated', with the
    punctuation re-set so only the content gives it away. skip=2 (a continuation after the first line): the rest
    shuffled, halved, or the first line repeated in its place. clauses: poem_clauses() of a poem; rng: a random.Random.
    Returns the text, one line per two clauses."""
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


def build_poetry_pairs(paths, n_poems=2000, n_val=100, seed=0, max_docs=0, errors=None):
    """(train pairs, held-out pairs, stats) from chinese-poetry files (any path readers.py reads). Per poem: asked by
    title (rejected: a corrupted poem), its author (rejected: a wrong author), the continuation of its first line
    (rejected: a corrupted one). The first well-formed poem of each title; n_poems picked with seed, the first n_val
    held out of every training pair. max_docs > 0 stops reading after that many documents. The reader's skipped records
    go to errors (a ReadErrors, created if None; counted in stats). ValueError naming the paths and counts when the
    poems are by fewer than two authors."""
    errors = ReadErrors() if errors is None else errors
    poems, seen, n_docs = [], set(), 0
    for doc in iter_documents(paths, errors=errors):
        n_docs += 1
        if max_docs and n_docs > max_docs:
            break
        title, author = doc.get("title"), doc.get("author")
        if not title or not author or len(title) > 12 or title in seen:
            continue
        clauses = poem_clauses("\n".join(poem_lines(doc)))
        if clauses is None:
            continue
        seen.add(title)
        poems.append({"title": title, "author": author, "clauses": clauses})
    rng = random.Random(seed)
    rng.shuffle(poems)
    poems = poems[:n_poems]
    authors = sorted({p["author"] for p in poems})
    if len(authors) < 2:
        raise ValueError(f"no preference pair from {', '.join(map(str, paths))}: {n_docs} documents read, "
                         f"{len(seen)} regular poems with a title and an author, by {len(authors)} author(s); "
                         f"the wrong-author pairs need poems by at least two ({errors.brief()})")

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
            {"system": None, "prompt": user(ASK_POEM.format(title=t)), "chosen": body,
             "rejected": corrupt(cl, kind, rng), "kind": f"poem/{kind}"},
            {"system": None, "prompt": user(ASK_AUTHOR.format(title=t)),
             "chosen": TELL_AUTHOR.format(title=t, author=a), "rejected": TELL_AUTHOR.format(title=t, author=wrong),
             "kind": "author"},
        ]
        if rest and rest_bad and rest != rest_bad:
            out.append({"system": None, "prompt": user(ASK_CONTINUE.format(line=first)), "chosen": rest,
                        "rejected": rest_bad, "kind": "continue"})
        return out

    val = [x for k, p in enumerate(poems[:n_val]) for x in pairs_of(p, k)]
    train = [x for k, p in enumerate(poems[n_val:]) for x in pairs_of(p, k)]
    rng.shuffle(train)
    stats = {"documents read": n_docs, "corpus records skipped by the reader": errors.count,
             "regular poems": len(seen), "poems used": len(poems),
             "held-out poems": min(n_val, len(poems)), "train pairs": len(train), "held-out pairs": len(val),
             "kinds": dict(Counter(x["kind"] for x in train))}
    return train, val, stats
