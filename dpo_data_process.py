"""
Preference data for dpo.py: build the demo preference set from the chinese-poetry corpus, or count what the
loader makes of preference files (any of the formats babyllama/preferences.py reads).

    python dpo_data_process.py --demo_poetry=data/chinese-poetry --out_dir=out/demo/dpo_data
    python dpo_data_process.py --count="../shared/data/dpo/dpo_zh_500.jsonl,../shared/data/dpo/dpo_zh_demo.json"
    python dpo_data_process.py --mismatched=out/zh/sft_data/train.jsonl --out_dir=out/zh/dpo_data \
        --mismatched_sources=medical_dialogue_internal.csv,niutrans_pairs.jsonl

The demo set: per poem, the poem asked by its title (chosen: the real poem; rejected: its clauses shuffled,
cut to half, or its first line repeated), its author (rejected: another poet of the set) and the continuation
of its first line (rejected: a corrupted continuation), with the prompts of sft_data_process.py's demo SFT set.
Held-out pairs (val.jsonl) come from poems in no training pair; see babyllama.poetry.build_poetry_pairs().

--mismatched builds pairs from chat fine-tuning conversations (sft_data_process.py's train file, so no evaluation
question is among them): the prompt and its own reply (chosen) against the reply of another conversation of the same
source (rejected), which is fluent and on the domain but answers something else, so the model learns to answer the
question it was asked. mismatched_pairs conversations are picked with seed, the first mismatched_val held out.
Torch-free.
"""
import glob
import json
import os
import random

from babyllama.atomic import write_json
from babyllama.configurator import run_main
from babyllama.conversations import load_conversations
from babyllama.poetry import build_poetry_pairs
from babyllama.preferences import load_preferences, write_pairs
from babyllama.records import ReadErrors

# -----------------------------------------------------------------------------------------------------------
demo_poetry = ""  # the chinese-poetry corpus (a directory, file or glob babyllama.readers reads)
demo_glob = "dist/quantangshi/poet.tang.*.json"  # which of its files, under demo_poetry ("" = all of it)
out_dir = "out/dpo_data"
demo_poems = 2000  # poems used (3 pairs each)
demo_val_poems = 60  # of which held out (3 pairs each)
seed = 1337
count = ""  # comma-separated preference files: print the loaders' counts and exit
mismatched = ""  # SFT conversations (.jsonl/.parquet): pairs whose rejected reply belongs to another conversation
mismatched_sources = ""  # comma-separated source names (the conversations' "source": input file names); "" = all
mismatched_pairs = 600  # conversations picked (one pair each)
mismatched_val = 40  # of which held out
# -----------------------------------------------------------------------------------------------------------


def mismatched_pairs_from(convs, n, rng):
    """n pairs from single-exchange conversations (list of {"messages", "system", "source"}): the question, its own
    reply chosen and, rejected, the reply of a random conversation of the same source; a draw of the same reply gives
    no pair (so a few fewer than n). Sources with fewer than two conversations give none."""
    by_source = {}
    for c in convs:
        if len(c["messages"]) == 2:
            by_source.setdefault(c["source"], []).append(c)
    usable = [c for group in by_source.values() if len(group) > 1 for c in group]
    pairs = []
    for c in rng.sample(usable, min(n, len(usable))):
        other = rng.choice(by_source[c["source"]])
        if other["messages"][1]["content"] == c["messages"][1]["content"]:
            continue  # itself (or the same reply): no pair, so a few fewer than n
        pairs.append({"system": c["system"], "prompt": c["messages"][:1], "chosen": c["messages"][1]["content"],
                      "rejected": other["messages"][1]["content"], "kind": c["source"]})
    return pairs


def build_mismatched():
    """Write out_dir/train.jsonl, val.jsonl and stats.json of mismatched-reply pairs (see the module docstring)."""
    wanted = {s for s in mismatched_sources.split(",") if s}
    convs = [c for c in load_conversations(mismatched) if not wanted or c["source"] in wanted]
    if wanted - {c["source"] for c in convs}:
        missing = sorted(wanted - {c["source"] for c in convs})
        raise ValueError(f"{mismatched}: no conversation from {', '.join(missing)}")
    pairs = mismatched_pairs_from(convs, mismatched_pairs, random.Random(seed))
    val, train = pairs[:mismatched_val], pairs[mismatched_val:]
    if not train:
        raise ValueError(f"{mismatched}: no training pair ({len(pairs)} pairs, mismatched_val={mismatched_val})")
    stats = {"train": len(train), "val": len(val), "per_source": {k: sum(p["kind"] == k for p in train)
                                                                 for k in sorted({p["kind"] for p in train})}}
    write_pairs(os.path.join(out_dir, "train.jsonl"), train)
    write_pairs(os.path.join(out_dir, "val.jsonl"), val)
    write_json(os.path.join(out_dir, "stats.json"), stats)
    print(f"mismatched-reply pairs in {out_dir}: {stats}")


def main():
    """Count preference files (count) or build the demo set into out_dir. Raises OSError / ValueError naming the
    input for a missing, empty or unusable one, and ValueError when the demo set would have no training pair;
    nothing is written then."""
    if count:
        for path in [p for p in count.split(",") if p]:
            errors = ReadErrors()
            pairs, counts = load_preferences(path, errors)
            turns = sum(len(p["prompt"]) for p in pairs) / len(pairs)
            print(json.dumps({"file": path, **dict(counts), "mean prompt turns": round(turns, 2)},
                             ensure_ascii=False))
            if errors.count:
                print(errors.report())
        return
    if mismatched:
        return build_mismatched()
    if not demo_poetry:
        raise SystemExit("nothing to do: give --demo_poetry=..., --mismatched=... or --count=...")
    paths = sorted(glob.glob(os.path.join(demo_poetry, demo_glob))) if demo_glob else [demo_poetry]
    if not paths:
        raise SystemExit(f"no files match {os.path.join(demo_poetry, demo_glob)} (run make download)")
    errors = ReadErrors(max_examples=3)  # the corpus reader's own skips: counted in stats, the first named
    train, val, stats = build_poetry_pairs(paths, demo_poems, demo_val_poems, seed, errors=errors)
    if not train:  # checked before out_dir is touched: an empty training set is never written
        raise ValueError(f"no training pair from {demo_poetry}: all {stats['poems used']} poems used are held out "
                         f"(demo_val_poems={demo_val_poems}); stats: {stats}")
    write_pairs(os.path.join(out_dir, "train.jsonl"), train)
    write_pairs(os.path.join(out_dir, "val.jsonl"), val)
    write_json(os.path.join(out_dir, "stats.json"), stats)
    print(f"demo preference set in {out_dir}: {stats}")
    if errors.count:
        print(errors.report())


if __name__ == "__main__":
    run_main(globals(), main)
