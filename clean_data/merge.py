"""
Merge datasets into one parquet with per-source sampling ratios (data mixing), deterministic with a seed.

    python -m clean_data merge --inputs="out/clean/med/clean.parquet:1,out/clean/general/clean.parquet:3" \
        --out=out/clean/mix.parquet

Each input is "path:weight" (path as iter_documents takes it: file, directory or glob). Output shares
follow the weights: source i gets round(total * w_i / sum(w)) documents. total_docs=0 means the largest
mixture that repeats nothing (the source that runs out first decides); a larger total_docs repeats a
source's documents (whole passes, then a sample) -- upsampling a small domain set is the point of mixing.
Which documents are taken and the interleaving order depend only on the seed and the inputs. Two passes:
one to count each source, one to stream the chosen documents out, so memory holds indices, not texts.
"""
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

from babyllama.readers import iter_documents
from babyllama.records import ReadErrors

# -----------------------------------------------------------------------------
inputs = ""  # "path:weight,path:weight"
out = "out/clean/mix.parquet"
total_docs = 0  # 0 = as many as possible without repeating any document
seed = 1337
text_field = ""
# -----------------------------------------------------------------------------


def parse_inputs(spec):
    """'a.parquet:1,b/:3' -> [('a.parquet', 1.0), ('b/', 3.0)]"""
    pairs = []
    for part in [p for p in spec.split(",") if p]:
        path, _, w = part.rpartition(":")
        if not path:
            raise ValueError(f"input {part!r} must look like path:weight")
        pairs.append((path, float(w)))
    return pairs


def plan(sizes, weights, total=0):
    """Documents to take from each source: proportional to the weights, summing to total (or, with
    total=0, the largest total that takes no source past its size)."""
    shares = [w / sum(weights) for w in weights]
    if total <= 0:
        total = int(min(n / s for n, s in zip(sizes, shares) if s > 0))
    return [round(total * s) for s in shares]


def choose(n, k, rng):
    """k row numbers out of n: whole passes over all rows, then a sample without replacement.
    Returns {row: times}."""
    times = {i: k // n for i in range(n)} if k >= n else {}
    for i in rng.sample(range(n), k % n if n else 0):
        times[i] = times.get(i, 0) + 1
    return {i: t for i, t in times.items() if t}


def merge(sources, out, total=0, seed=1337, text_field=""):
    """sources: [(path, weight)]. Writes the parquet (text, source, dataset) and out + '.json' (the plan);
    returns that report."""
    errors = ReadErrors()
    sizes = [sum(1 for _ in iter_documents([p], text_field=text_field or None, errors=errors)) for p, _ in sources]
    takes = plan(sizes, [w for _, w in sources], total)
    chosen = [choose(n, k, random.Random(f"{seed}:{i}")) for i, (n, k) in enumerate(zip(sizes, takes))]

    def stream(i):  # the chosen documents of source i, in file order, each as often as chosen
        for row, doc in enumerate(iter_documents([sources[i][0]], text_field=text_field or None)):
            for _ in range(chosen[i].get(row, 0)):
                yield doc

    # interleave: draw the next source with probability proportional to what it has left, so the mixture
    # is even along the file, not one dataset after another
    rng, its, left = random.Random(seed), [stream(i) for i in range(len(sources))], list(takes)
    schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("dataset", pa.string())])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with pq.ParquetWriter(out, schema, compression="zstd") as w:
        rows = []
        while sum(left):
            i = rng.choices(range(len(left)), weights=left)[0]
            left[i] -= 1
            doc = next(its[i])
            rows.append({"text": doc["text"], "source": str(doc["source"]), "dataset": sources[i][0]})
            if len(rows) == 50_000 or not sum(left):
                w.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
    report = {"out": out, "seed": seed, "sources": [{"path": p, "weight": wt, "available": n, "taken": k}
                                                   for (p, wt), n, k in zip(sources, sizes, takes)],
              "read_errors": errors.to_dict()}
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    return report


def main():
    """python -m clean_data merge: mix with the globals above, as the command line set them."""
    r = merge(parse_inputs(inputs), out, total_docs, seed, text_field)
    for s in r["sources"]:
        print(f"{s['taken']:>10,} of {s['available']:>10,}  weight {s['weight']:g}  {s['path']}")
    print(f"-> {out}")
