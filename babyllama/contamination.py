"""Contamination: which items of an evaluation set have a near-duplicate in the training data, and reading both
(contamination.py).

Texts are compared as clean_data's dedup compares documents: normalised (clean_data.normalize) and cut into hashed
character 5-gram shingles (clean_data.shingles). An item is contaminated when one training document contains at least
`threshold` of its shingles (containment |I ∩ D| / |I|, exact, no sampling).

Not the dedup stage's MinHash/LSH Jaccard: a 60-character question inside a 2,000-character document has a Jaccard of
about 0.03, so an LSH tuned for near-duplicates would never return the pair; containment is what contamination means
(the n-gram overlap of GPT-3's and Llama 2's studies) and, with the eval set's shingles in one sorted array, costs one
vectorised lookup per training chunk. The best document's Jaccard is reported beside it. Reordered characters share no
5-gram, so are not flagged."""
import os

import numpy as np

from babyllama.mc import load_exam
from babyllama.qa_files import read_gen_items, read_questions
from babyllama.readers import iter_documents
from babyllama.records import ReadErrors, iter_records
from babyllama.token_files import check_bin, read_meta
from clean_data.shingles import shingle_hashes
from clean_data.normalize import normalize
from tokenizer import Tokenizer

SHINGLE = 5


def item_shingles(texts):
    """Sorted unique shingle hashes of each text (normalised first)."""
    hashes, counts = shingle_hashes([normalize(t) for t in texts], SHINGLE)
    ends = np.cumsum(counts)
    return [np.unique(hashes[e - c:e]) for e, c in zip(ends, counts)]


def find_contamination(items, documents, chunk=4096, on_chunk=None):
    """items: [{"key", "text"}] (the evaluation set); documents: an iterable of {"text", optional "source", "line"} (the
    training data, streamed). For each item, the training document holding most of its shingles: a list parallel to
    items of {"containment", "jaccard", "source", "line", "excerpt"} (containment 0, source None when nothing is
    shared), and the number of documents read. on_chunk(n_docs) is called after each chunk of documents."""
    sets = item_shingles([it["text"] for it in items])
    all_h = np.concatenate(sets) if sets else np.zeros(0, np.uint64)
    owner = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    order = np.argsort(all_h, kind="stable")
    all_h, owner = all_h[order], owner[order]
    sizes = np.array([max(len(s), 1) for s in sets])
    best = [{"containment": 0.0, "jaccard": 0.0, "source": None, "line": None, "excerpt": ""} for _ in items]
    n_docs = 0
    buf = []

    def flush():
        texts = [normalize(d["text"]) for d in buf]
        hashes, counts = shingle_hashes(texts, SHINGLE)
        ends = np.cumsum(counts)
        doc_of = np.repeat(np.arange(len(buf)), counts)
        hits = np.bincount(doc_of[np.isin(hashes, all_h)], minlength=len(buf))
        for j in np.flatnonzero(hits):
            doc_h = np.unique(hashes[ends[j] - counts[j]:ends[j]])
            lo = np.searchsorted(all_h, doc_h, "left")
            hi = np.searchsorted(all_h, doc_h, "right")
            shared = np.concatenate([owner[a:b] for a, b in zip(lo, hi) if b > a])
            for i, n in zip(*np.unique(shared, return_counts=True)):
                c = n / sizes[i]
                if c > best[i]["containment"]:
                    d = buf[j]
                    best[i] = {"containment": float(c), "jaccard": float(n / (sizes[i] + len(doc_h) - n)),
                               "source": d.get("source"), "line": d.get("line"), "excerpt": d["text"][:200]}
        if on_chunk:
            on_chunk(len(buf))
        buf.clear()

    for doc in documents:
        buf.append(doc)
        n_docs += 1
        if len(buf) >= chunk:
            flush()
    if buf:
        flush()
    return best, n_docs


def flagged(items, best, threshold):
    """The items whose best training document reaches the containment threshold, with that document."""
    return [dict(key=it["key"], text=it["text"][:200], **b) for it, b in zip(items, best) if b["containment"] >= threshold]


# ---- the files ------------------------------------------------------------------------------------------------

def evaluation_items(path, split):
    """[{"key", "text"}] of an evaluation set: an mc folder (its split; key subject/id, text question + options),
    a questions file of eval.py --mode=chat (JSONL {"question", "reference", "kind"}; key kind/number, text the
    reference answer) or a gen JSONL file (key line number, text the reference)."""
    if os.path.isdir(path):
        exam = load_exam(path, split)
        return [{"key": f"{s}/{q['id']}", "text": q["question"] + "\n" + "\n".join(q["options"])}
                for s, p in exam.items() for q in p["questions"]]
    first = next(iter_records(path, ReadErrors()), (0, None))[1]
    if isinstance(first, dict) and "question" in first:
        items = [{"key": f"{it.get('kind', '')}/{i}", "text": it["reference"]}
                 for i, it in enumerate(read_questions(path), 1) if isinstance(it.get("reference"), str)]
        if not items:
            raise ValueError(f"{path}: no question with a \"reference\" string (the answer that is checked)")
        return items
    return [{"key": str(it["line"]), "text": it["reference"]} for it in read_gen_items(path)]


def training_documents(path, text_field=""):
    """The training documents, streamed as {"text", "source", "line"}: a data_process.py .bin decoded per document (its
    meta.json names the tokenizer), or anything readers.py reads (text_field: the records' field, "" = auto); several
    of these comma-separated, one after another."""
    if "," in path:
        for part in [p for p in path.split(",") if p]:
            yield from training_documents(part, text_field)
        return
    if not path.endswith(".bin"):
        yield from iter_documents([path], text_field=text_field or None)
        return
    meta = read_meta(path)
    btok = Tokenizer(meta["tokenizer_model"])
    data = np.memmap(path, dtype=check_bin(path, meta), mode="r")  # uint16, or uint32 for a vocabulary over 65,535
    step, start, line = 1 << 24, 0, 0
    while start < len(data):
        block = np.asarray(data[start:start + step])
        ends = np.flatnonzero(block == btok.eos_id)
        if len(ends) == 0 and start + step < len(data):
            raise SystemExit(f"{path}: a document longer than {step} tokens")
        last = ends[-1] + 1 if len(ends) and start + step < len(data) else len(block)
        for part in np.split(block[:last], ends[ends < last - 1] + 1 if len(ends) else []):
            line += 1
            yield {"text": btok.decode(part[part != btok.eos_id].tolist()), "source": path, "line": line}
        start += last
