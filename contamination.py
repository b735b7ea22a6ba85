"""
Contamination: which items of an evaluation set have a near-duplicate in the training data. Writes a JSON file
(every flagged item, its training document and line) and prints a markdown table; `eval.py --mode=mc
--contamination_file=...` then counts the flagged questions in its table. How items and documents are compared
(normalised character 5-gram shingles, containment): babyllama/contamination.py.

    python contamination.py --eval_set=out/demo/poetry_bench --train_data=out/demo/data/train.bin
    python contamination.py --eval_set=../shared/data/ceval --split=val --train_data=data/corpus.jsonl
"""
import os
import sys
import time

from tqdm import tqdm

from babyllama.atomic import write_json
from babyllama.configurator import configure
from babyllama.contamination import evaluation_items, find_contamination, flagged, training_documents
from babyllama.mc import MCError

# -----------------------------------------------------------------------------------------------------------
eval_set = ""  # an mc folder (its --split), eval.py's questions file (references checked) or a gen JSONL file
train_data = ""  # training data, comma-separated: .bin files of data_process.py (decoded), any corpus clean_data reads
split = "val"  # the split of an mc folder that is checked
text_field = ""  # .jsonl/.parquet training data: the field with the text ("" = auto)
threshold = 0.5  # an item is flagged when one training document contains this share of its 5-gram shingles
results_file = ""  # JSON out; "" = contamination.json beside the evaluation set
# -----------------------------------------------------------------------------------------------------------


def run_contamination(eval_set, train_data, split, text_field, threshold):
    """Flag the items of eval_set (an mc folder's split or a gen JSONL file) that a document of train_data nearly
    contains (babyllama/contamination.py). Returns (result: every flagged item and its document, markdown)."""
    items = evaluation_items(eval_set, split)
    bar = tqdm(desc="training documents", unit="doc", mininterval=0.5 if sys.stderr.isatty() else 30)
    t0 = time.time()
    best, n_docs = find_contamination(items, training_documents(train_data, text_field), on_chunk=bar.update)
    bar.close()
    hits = flagged(items, best, threshold)
    share = len(hits) / len(items)
    md = ("| evaluation set | items | training documents | flagged | share |\n|---|---:|---:|---:|---:|\n"
          f"| {eval_set} | {len(items):,} | {n_docs:,} | {len(hits):,} | {100 * share:.1f}% |\n\n"
          f"(flagged: one training document holds >= {threshold:.0%} of the item's character 5-grams; "
          f"{time.time() - t0:.0f} s)")
    if hits:
        md += "\n\n| item | containment | Jaccard | training document |\n|---|---:|---:|---|\n" + "\n".join(
            f"| {h['key']} | {h['containment']:.2f} | {h['jaccard']:.2f} | {h['source']}:{h['line']}: "
            f"{h['excerpt'][:40].replace(chr(10), ' / ').replace('|', '/')} |"
            for h in sorted(hits, key=lambda h: -h["containment"])[:10])
        md += f"\n\n(the {min(10, len(hits))} highest of {len(hits)}; all in the JSON file)"
    return dict(eval_set=eval_set, train_data=train_data, threshold=threshold, items=len(items),
                training_documents=n_docs, flagged=len(hits), share=share, flagged_items=hits), md


if __name__ == "__main__":
    configure(globals())
    if not 0 < threshold <= 1:
        raise SystemExit(f"want 0 < threshold <= 1, not {threshold}")
    for name, path in [("eval_set", eval_set)] + [("train_data", p) for p in train_data.split(",") if p]:
        if not os.path.exists(path):
            raise SystemExit(f"contamination.py needs --{name}: {path!r} does not exist")
    try:
        r, md = run_contamination(eval_set, train_data, split, text_field, threshold)
    except (MCError, OSError) as e:
        raise SystemExit(f"error: {e}")
    path = results_file or os.path.join(eval_set if os.path.isdir(eval_set) else os.path.dirname(eval_set),
                                        "contamination.json")
    print(md)
    write_json(path, dict(r, markdown=md))
    print(f"results -> {path}")
