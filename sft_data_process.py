"""
Instruction data in the formats people download -> one unified conversation file for sft.py.

    python sft_data_process.py --inputs=../shared/data/sft/alpaca_zh_demo.json,../shared/data/sft/sharegpt_zh_1K_format.jsonl \
        --tokenizer_model=out/demo/tok8k.model --out_dir=out/sft_data
    python sft_data_process.py --demo_poetry=data/chinese-poetry --tokenizer_model=out/demo/tok8k.model --out_dir=out/demo/sft_data

Output, in out_dir: train.jsonl and val.jsonl (or .parquet), one conversation per line
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "system": "..." or null, "source": "<file name>"}
(chat_data.conversations.load_conversations reads them back) and stats.json with every counter printed.

Input formats (Alpaca, BELLE, ShareGPT, OpenAI messages) are detected per record, in .json arrays or concatenated
records, .jsonl and .parquet (.gz too); see chat_data/conversations.py. Malformed records (bad JSON, unknown
format, wrong field types) are skipped, counted by reason and the first ones named as file:line. Filters, each
counted: empty turns, turns that do not alternate user/assistant (or do not end with the assistant),
conversations longer than max_seq_len + 1 tokens after the chat template (overlong="drop", or "truncate" to the
longest prefix of whole exchanges that fits), and exact duplicates. Sources mix with `ratios` (a ratio of 0.5
keeps a random half of a source, 2.0 repeats it twice, 1.5 once plus a random half), deterministic with `seed`;
`val_fraction` of the conversations is held out.

--demo_poetry builds a demo set from the chinese-poetry corpus' own metadata (titles, authors, lines) so the
demo needs no other download; see chat_data.poetry.build_poetry_demo(). Its held-out poems also give
eval_questions.jsonl.
"""
import json
import os
import random
from collections import Counter

from chat_data.conversations import Filter, mix, read_raw_conversations, write_conversations
from chat_data.poetry import build_poetry_demo
from clean_data.readers import ReadErrors
from configurator import apply_overrides

# -----------------------------------------------------------------------------------------------------------
inputs = ""  # comma-separated files (.json, .jsonl, .parquet)
ratios = ""  # comma-separated sampling ratio per input ("" = 1 each)
demo_poetry = ""  # path to the chinese-poetry corpus: add the demo poetry SFT set
demo_max_poems = 8000  # poems used for the demo set (regular 5/7-character poems, picked with seed)
demo_eval_poems = 200  # of which held out for evaluation (no conversation about them is trained on)
tokenizer_model = ""  # needed for the length filter; "" = no length filter
max_seq_len = 256  # the model's context; conversations are at most max_seq_len + 1 tokens
overlong = "drop"  # 'drop' or 'truncate'
dedup = True
val_fraction = 0.02
out_dir = "out/sft_data"
out_format = "jsonl"  # 'jsonl' or 'parquet'
seed = 1337
# -----------------------------------------------------------------------------------------------------------


def main():
    if overlong not in ("drop", "truncate"):
        raise SystemExit(f"overlong must be 'drop' or 'truncate', not {overlong!r}")
    tok = None
    if tokenizer_model:
        from tokenizer import Tokenizer
        tok = Tokenizer(tokenizer_model)
    paths = [p for p in inputs.split(",") if p]
    rs = [float(r) for r in ratios.split(",") if r] or [1.0] * len(paths)
    if len(rs) != len(paths):
        raise SystemExit(f"{len(paths)} inputs but {len(rs)} ratios")
    if not paths and not demo_poetry:
        raise SystemExit("nothing to do: give --inputs=... and/or --demo_poetry=...")
    errors, formats = ReadErrors(), Counter()
    limit = max_seq_len + 1 if max_seq_len else 0  # max_seq_len + 1 tokens give max_seq_len targets
    filt = Filter(tok, limit, overlong, dedup)
    per_source, stats = [], {}
    for p in paths:
        parsed = list(read_raw_conversations(p, errors, formats))
        kept = [c for c in map(filt, parsed) if c is not None]
        per_source.append(kept)
        print(f"{p}: {len(parsed):,} conversations parsed, {len(kept):,} kept")
    rng = random.Random(seed)
    convs = mix(per_source, rs, rng)
    rng.shuffle(convs)
    n_val = int(round(val_fraction * len(convs))) if convs else 0
    val, train = convs[:n_val], convs[n_val:]
    if demo_poetry:
        demo_filter = Filter(tok, limit, overlong, dedup)
        corpus_errors = ReadErrors(max_examples=3)  # the corpus reader's own skips, summarised only
        dtrain, dval, questions, demo_stats = build_poetry_demo(demo_poetry, demo_max_poems, demo_eval_poems,
                                                                seed, corpus_errors)
        demo_stats["corpus records skipped by the reader"] = corpus_errors.count
        dtrain = [c for c in map(demo_filter, dtrain) if c is not None]
        dval = [c for c in map(demo_filter, dval) if c is not None]
        train, val = train + dtrain, val + dval
        rng.shuffle(train)
        qpath = os.path.join(out_dir, "eval_questions.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        with open(qpath, "w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
        stats["demo"] = dict(demo_stats, filters=dict(demo_filter.counts))
        print(f"demo set from {demo_poetry}: {demo_stats}; filters {dict(demo_filter.counts)}; "
              f"{len(questions)} evaluation questions -> {qpath}")
    ext = "parquet" if out_format == "parquet" else "jsonl"
    write_conversations(os.path.join(out_dir, f"train.{ext}"), train, out_format)
    write_conversations(os.path.join(out_dir, f"val.{ext}"), val, out_format)
    turns = Counter(len(c["messages"]) // 2 for c in train + val)
    stats.update(formats=dict(formats), filters=dict(filt.counts), malformed=errors.to_dict(),
                 train=len(train), val=len(val), exchanges_per_conversation=dict(sorted(turns.items())),
                 with_system=sum(1 for c in train + val if c.get("system")))
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=1)
    print(f"formats detected: {dict(formats)}")
    print("filters: " + ", ".join(f"{k} {v:,}" for k, v in filt.counts.most_common()))
    print(errors.report())
    print(f"exchanges per conversation: {dict(sorted(turns.items()))}; with a system prompt: {stats['with_system']}")
    print(f"wrote {len(train):,} train and {len(val):,} val conversations to {out_dir}")
    return stats


if __name__ == "__main__":
    apply_overrides(globals())
    main()
