"""clean_data/ in one process: filters, normalisation, exact/MinHash/SimHash dedup, the pipeline's parquet and
report, merging, and the Redis-shared index against a real redis-server. Its command line (python -m clean_data):
tests/scripts/test_clean_data_cli.py."""
import json
import os
import random
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from simhash import Simhash

from clean_data import dedup, filters, shards, shingles
from clean_data.clean import clean, verdicts
from clean_data.decide import STAGES
from clean_data.merge import merge, plan
from clean_data.normalize import normalize

rng = random.Random(0)
COMMON = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))  # 400 distinct ideographs


def long_doc(seed, n=300):
    r = random.Random(seed)
    return "".join(r.choice(COMMON) for _ in range(n))


def edit(text, k, seed=1):
    """text with k characters replaced."""
    r, chars = random.Random(seed), list(text)
    for i in r.sample(range(len(chars)), k):
        chars[i] = "鑫"
    return "".join(chars)


def shuffled_sentences(text, seed=2):
    """Same characters, other order: sentences of 6 characters permuted, then each reversed."""
    parts = [text[i:i + 6][::-1] for i in range(0, len(text), 6)]
    random.Random(seed).shuffle(parts)
    return "".join(parts)


def jaccard(a, b, n=5):
    sa, sb = {a[i:i + n] for i in range(len(a) - n + 1)}, {b[i:i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


# ---- filters ----------------------------------------------------------------------------------------------

def test_each_filter_on_hand_written_examples():
    ok = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert filters.check(ok) is None
    assert filters.check("短诗。") == "too_short"
    assert filters.check("长" * 50, dict(filters.DEFAULTS, max_chars=40, max_dup_ngram_frac=1.0)) == "too_long"
    assert filters.check("1234567890 2345678901 !!!! 3456789") == "low_text_frac"
    assert filters.check(long_doc(9, 30) + "★☆♥" * 2) == "symbols"
    assert filters.check("春眠不觉晓\n" * 4 + "处处闻啼鸟") == "dup_lines"
    assert filters.check("点击这里下载最新版本的软件" * 5) == "dup_ngrams"
    assert filters.text_frac("abc12") == pytest.approx(0.6)
    assert filters.symbol_frac("，。！？") == 0  # punctuation is not a special symbol
    assert filters.dup_line_frac("a\nb\na\na") == 0.5
    assert filters.dup_ngram_frac("甲乙丙丁戊己庚辛壬癸" * 3, 10) == 1.0
    assert filters.dup_ngram_frac(long_doc(3), 10) == 0.0


def test_normalise_folds_width_space_punctuation_case_only_for_comparison():
    assert normalize("床前明月光，疑是地上霜。") == normalize("床前明月光 疑是地上霜!")
    assert normalize("ＡＢＣ１２３") == "abc123"  # NFKC full-width, case
    assert normalize("Hello,\tWorld") == "helloworld"


def test_traditional_to_simplified_when_opencc_present():
    pytest.importorskip("opencc", reason="opencc not installed: t2s folding is optional")
    assert normalize("學而時習之", t2s=True) == normalize("学而时习之", t2s=True)


# ---- dedup primitives ---------------------------------------------------------------------------------------

def test_vectorised_simhash_equals_the_simhash_package():
    text = long_doc(5, 80)
    feats = [text[i:i + 5] for i in range(len(text) - 4)]
    hashes, counts = shingles.shingle_hashes([text], 5)
    ours = int(dedup.simhash_fingerprints(hashes, counts)[0])
    table = {f: int(shingles.shingle_hashes_of(f)[0]) for f in feats}
    ref = Simhash(feats, f=64, hashfunc=lambda b: table.get(b.decode(), 0))
    assert ours == ref.value


def test_minhash_estimates_jaccard():
    perms = dedup.permutations(256)
    base = long_doc(7)
    for k in (5, 20, 60):
        other = edit(base, k)
        h, c = shingles.shingle_hashes([normalize(base), normalize(other)])
        sig = dedup.minhash_signatures(h, c, perms)
        assert abs(np.mean(sig[0] == sig[1]) - jaccard(base, other)) < 0.08


@pytest.mark.parametrize("method", ["minhash", "simhash"])
def test_near_dup_caught_and_reordered_text_kept(method):
    base = long_doc(11, 600)
    near = edit(base, 2)  # a few characters edited in a long document
    reordered = shuffled_sentences(base)  # same characters, different order
    assert jaccard(base, near) > 0.9 and jaccard(base, reordered) < 0.2
    assert sorted(base) == sorted(reordered)  # single-character shingles would call these identical
    code, partner, _ = verdicts([base, near, reordered], stages=method, num_workers=1)
    assert code.tolist() == [0, 1 + STAGES.index(method), 0]
    assert partner[1] == 0  # the near-duplicate points at the first of its cluster


def test_exact_dedup_on_normalised_text():
    texts = ["白日依山尽，黄河入海流。", "白日依山尽 黄河入海流", "白日依山尽，长江入海流。"]
    code, partner, _ = verdicts(texts, stages="exact", num_workers=1)
    assert code.tolist() == [0, 2, 0] and partner[1] == 0


def test_minhash_candidates_are_verified_by_exact_jaccard():
    # three documents whose band hashes all agree (LSH says: candidates) but whose texts overlap little: exact
    # Jaccard decides, so only the real near-duplicate goes, pointing at the kept document it matches
    a, b = long_doc(21, 200), long_doc(22, 200)
    near = edit(a, 2)
    same_bands = np.zeros((3, 20), np.uint64)
    removed = dedup.resolve_component(same_bands, [a, b, near], threshold=0.8)
    assert [(j, i) for j, i, _ in removed] == [(2, 0)]
    assert removed[0][2] == pytest.approx(jaccard(a, near))
    assert dedup.resolve_component(np.arange(3, dtype=np.uint64)[:, None], [a, b, a], 0.8) == []  # no band shared


def test_union_find_matches_a_plain_search():
    r = np.random.default_rng(0)
    n = 300
    u, v = r.integers(0, n, 250), r.integers(0, n, 250)
    label = dedup.union(np.arange(n, dtype=np.int64), u, v)
    adj = {i: set() for i in range(n)}
    for x, y in zip(u.tolist(), v.tolist()):
        adj[x].add(y)
        adj[y].add(x)
    for start in range(n):  # every node's component by depth-first search; its label = its smallest node
        seen, todo = {start}, [start]
        while todo:
            for y in adj[todo.pop()] - seen:
                seen.add(y)
                todo.append(y)
        assert label[start] == min(seen)


def test_simhash_pairs_equal_all_pairs():
    r = np.random.default_rng(1)
    base = r.integers(0, 2 ** 63, 200, dtype=np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in r.choice(64, k, replace=False))) for k in r.integers(0, 6, 200)]
    fps = np.concatenate([base, base ^ np.array(flips, np.uint64)])  # half within 0-5 bits of the other half
    alive = r.random(len(fps)) > 0.1
    i, j = dedup.simhash_pairs(fps, alive, 3)
    want = {(x, y) for x in range(len(fps)) for y in range(x + 1, len(fps))
            if alive[x] and alive[y] and bin(int(fps[x]) ^ int(fps[y])).count("1") <= 3}
    assert set(zip(i.tolist(), j.tolist())) == want and len(want) > 50


def chain():
    """A ~ B ~ C (exact Jaccard >= 0.8 each) with J(A, C) < 0.8: five edits in each half of a 300-character text."""
    a = long_doc(31, 300)
    b = "".join("鑫" if k in range(5, 150, 30) else ch for k, ch in enumerate(a))
    c = "".join("淼" if k in range(155, 300, 30) else ch for k, ch in enumerate(b))
    assert jaccard(a, b) >= 0.8 and jaccard(b, c) >= 0.8 and jaccard(a, c) < 0.8
    return a, b, c


def test_chain_resolves_in_document_order():
    a, b, c = chain()
    fillers = [long_doc(40 + k, 120) for k in range(6)]
    texts = [a, fillers[0], b, fillers[1], c] + fillers[2:]
    code, partner, score = verdicts(texts, stages="minhash", num_workers=1)
    assert code[[0, 2, 4]].tolist() == [0, 3, 0]  # B goes (A is kept), C stays: its only partner B was removed
    assert partner[2] == 0 and score[2] == pytest.approx(jaccard(a, b))
    code, partner, _ = verdicts([b, a, c], stages="minhash", num_workers=1)  # B first: both others are its near-dups
    assert code.tolist() == [0, 3, 3] and partner[1:].tolist() == [0, 0]


# ---- the pipeline -------------------------------------------------------------------------------------------

def write_corpus(d):
    docs = [long_doc(i, 120) for i in range(40)]
    lines = [{"text": t, "id": i} for i, t in enumerate(docs)]
    lines.append({"text": docs[0]})                                 # exact duplicate
    lines.append({"text": docs[1].replace(docs[1][10], "，", 1)})    # exact after normalisation? no: near
    lines.append({"text": edit(docs[2], 2)})                        # near duplicate
    lines.append({"text": "短"})                                    # too short
    lines.append({"text": long_doc(999, 40) + "★☆" * 4})              # symbols
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "a.jsonl", "w", encoding="utf-8") as f:
        for i, rec in enumerate(lines):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if i == 5:
                f.write('{"text": "broken\n')  # corrupt line 7
    poems = [{"title": "静夜思", "author": "李白",
              "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]}]
    with open(d / "poems.json", "w", encoding="utf-8") as f:
        json.dump(poems, f, ensure_ascii=False)
    return docs


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(d / "in")
    report = clean(str(d / "in"), str(d / "out"), num_workers=2, chunk_docs=7, progress=False)
    return d, docs, report


def test_pipeline_counts_stages_and_reasons(cleaned):
    d, docs, r = cleaned
    assert r["documents_in"] == 46
    st = r["stages"]
    assert st["filter"]["removed_by"] == {"too_short": 1, "symbols": 1}
    assert st["exact"]["removed"] == 1
    assert st["minhash"]["removed"] == 2  # the edited document and the one with a character replaced
    assert r["documents_out"] == 46 - 2 - 1 - 2 - st["simhash"]["removed"]
    assert r["read_errors"]["malformed_records"] == 1
    assert "a.jsonl:7: bad json" in r["read_errors"]["malformed_examples"][0]
    removed = [json.loads(l) for l in open(d / "out" / "removed.jsonl", encoding="utf-8")]
    assert {x["reason"] for x in removed} >= {"too_short", "symbols", "exact_dup", "near_dup"}
    dup = next(x for x in removed if x["reason"] == "exact_dup")
    assert dup["text"] == docs[0] and dup["dup_of"] == 0
    for key in ("seconds", "docs_per_s"):
        assert key in st["minhash"]
    assert r["peak_rss_mb"]["main"] > 0


def test_output_parquet_schema_and_text_unchanged(cleaned):
    d, docs, r = cleaned
    t = pq.read_table(d / "out" / "clean.parquet")
    assert t.schema.names == ["text", "source", "line", "title", "author", "collection", "id"]
    assert str(t.schema.field("text").type) == "string"
    assert pq.ParquetFile(d / "out" / "clean.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    rows = t.to_pylist()
    assert rows[0]["text"] == docs[0] and rows[0]["id"] == "0"  # kept text verbatim, first one kept
    poem = next(x for x in rows if x["title"] == "静夜思")
    assert poem["author"] == "李白" and poem["source"].endswith("poems.json")


def test_stages_one_by_one_match_together(cleaned, tmp_path):
    d, docs, r = cleaned
    a = clean(str(d / "in"), str(tmp_path / "a"), stages="filter,exact", num_workers=1, progress=False)
    b = clean(str(tmp_path / "a" / "clean.parquet"), str(tmp_path / "b"), stages="minhash,simhash",
              num_workers=1, progress=False)
    assert b["documents_out"] == r["documents_out"]
    assert a["documents_out"] == r["stages"]["minhash"]["in"]


def test_clean_refuses_an_unknown_setting(tmp_path):
    with pytest.raises(TypeError, match="min_char"):
        clean(str(tmp_path), str(tmp_path / "out"), min_char=5)  # a typo of min_chars
    with pytest.raises(ValueError, match="dedupe"):
        clean(str(tmp_path), str(tmp_path / "out"), stages="filter,dedupe")
    assert not (tmp_path / "out").exists()  # refused before writing anything


# ---- merging --------------------------------------------------------------------------------------------

def test_merge_ratios_hold_and_are_deterministic(tmp_path):
    pq.write_table(pa.table({"text": [f"医学{i}" for i in range(300)]}), tmp_path / "med.parquet")
    pq.write_table(pa.table({"text": [f"通用{i}" for i in range(2000)]}), tmp_path / "gen.parquet")
    src = [(str(tmp_path / "med.parquet"), 1), (str(tmp_path / "gen.parquet"), 3)]
    r = merge(src, str(tmp_path / "mix.parquet"), seed=1)
    assert [s["taken"] for s in r["sources"]] == [300, 900]  # medical runs out first: 1 : 3
    texts = pq.read_table(tmp_path / "mix.parquet").column("text").to_pylist()
    assert sum(t.startswith("医学") for t in texts) * 3 == sum(t.startswith("通用") for t in texts)
    assert len(set(texts)) == len(texts)
    assert sum(t.startswith("医学") for t in texts[:400]) in range(60, 141)  # interleaved, not blocked
    merge(src, str(tmp_path / "mix2.parquet"), seed=1)
    assert pq.read_table(tmp_path / "mix2.parquet").column("text").to_pylist() == texts
    up = merge(src, str(tmp_path / "mix3.parquet"), total=4000, seed=1)  # upsampling repeats medical
    assert [s["taken"] for s in up["sources"]] == [1000, 3000]
    assert plan([10, 10], [1, 1], 0) == [10, 10]


# ---- Redis-shared index ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server); Redis-shared index not tested")
    pytest.importorskip("redis", reason="redis python client not installed (pip install redis)")
    proc, url = shards.start_server(exe, tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(5)


def planted_corpus(d, parts=3):
    """Documents with known near-duplicates, in `parts` jsonl files (in corpus order): 40 originals, variants
    of the first 15 with 1-8 characters edited (some above J = 0.8, some below), exact copies, the A ~ B ~ C
    chain, shuffled. Returns the list of files."""
    r = random.Random(5)
    base = [long_doc(200 + k, 150) for k in range(40)]
    texts = base + [edit(base[k], r.randint(1, 8), seed=k * 10 + v) for k in range(15) for v in range(2)]
    texts += [base[3], base[4]] + list(chain())
    r.shuffle(texts)
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(parts):
        files.append(str(d / f"part{k}.jsonl"))
        with open(files[-1], "w", encoding="utf-8") as f:
            for i in range(k * len(texts) // parts, (k + 1) * len(texts) // parts):
                f.write(json.dumps({"text": texts[i], "id": f"doc{i}"}, ensure_ascii=False) + "\n")
    return files


def kept_ids(out_dir):
    return sorted(pq.read_table(os.path.join(out_dir, "clean.parquet"), columns=["id"]).column("id").to_pylist())


def test_removed_only_with_a_verified_partner(tmp_path):
    files = planted_corpus(tmp_path / "in")
    r = clean(files, str(tmp_path / "out"), num_workers=1, progress=False)
    by_id, removed = {}, []
    for f in files:
        for line in open(f, encoding="utf-8"):
            by_id[len(by_id)] = json.loads(line)["text"]  # running number = document id in one process
    removed = [json.loads(l) for l in open(tmp_path / "out" / "removed.jsonl", encoding="utf-8")]
    gone = {x["doc"]: x["stage"] for x in removed}
    near = [x for x in removed if x["stage"] == "minhash"]
    assert len(near) >= 10 and r["stages"]["minhash"]["removed"] == len(near)
    for x in near:  # the partner is named, really is a near-duplicate, and survived the stages up to MinHash
        assert x["jaccard"] >= 0.8
        assert jaccard(normalize(x["text"]), normalize(by_id[x["dup_of"]])) == pytest.approx(x["jaccard"], abs=1e-4)
        assert gone.get(x["dup_of"]) in (None, "simhash") and x["dup_of"] < x["doc"]


@pytest.mark.parametrize("chunk_docs,num_workers", [(7, 1), (1000, 2)])
def test_kept_set_independent_of_chunks_and_workers(tmp_path, chunk_docs, num_workers):
    files = planted_corpus(tmp_path / "in")
    clean(files, str(tmp_path / "one"), chunk_docs=1, num_workers=1, progress=False)
    clean(files, str(tmp_path / "other"), chunk_docs=chunk_docs, num_workers=num_workers, progress=False)
    assert kept_ids(tmp_path / "one") == kept_ids(tmp_path / "other")
    assert len(kept_ids(tmp_path / "one")) < 40 + 30 + 5 - 5  # duplicates were removed


def run_shards(files_per_shard, out, redis_url, prefix, order):
    """clean() on each shard at once (threads, started in `order`); returns each shard's out_dir."""
    outs, errors = [str(out / f"shard{s}") for s in range(len(files_per_shard))], []

    def one(s):
        try:
            clean(files_per_shard[s], outs[s], redis_url=redis_url, redis_prefix=prefix, shard_id=s,
                  num_shards=len(files_per_shard), num_workers=1, chunk_docs=5, progress=False, redis_timeout=60.0)
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(s,)) for s in order]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    return outs


def test_redis_shards_keep_what_one_process_keeps(redis_url, tmp_path):
    files = planted_corpus(tmp_path / "in", parts=4)
    clean(files, str(tmp_path / "single"), num_workers=1, progress=False)
    want = kept_ids(tmp_path / "single")
    for layout, order in (([files[:2], files[2:]], [1, 0]), ([[f] for f in files], [2, 0, 3, 1])):
        outs = run_shards(layout, tmp_path / f"n{len(layout)}", redis_url, f"t{len(layout)}", order)
        assert sorted(sum((kept_ids(o) for o in outs), [])) == want
        alls = [o for o in outs if os.path.exists(os.path.join(o, "report_all.json"))]
        assert len(alls) == 1  # the last shard to finish wrote the combined report
        total = json.load(open(os.path.join(alls[0], "report_all.json")))
        assert total["documents_out"] == len(want) and len(total["shards"]) == len(layout)
    import redis
    assert redis.Redis.from_url(redis_url).keys("t2:*") == []  # the run's keys were deleted


def test_chain_across_shards_resolves_as_in_one_process(redis_url, tmp_path):
    a, b, c = chain()
    files = []
    for k, text in enumerate((a, b, c)):  # A, B and C each on its own shard, among unrelated documents
        files.append(str(tmp_path / f"s{k}.jsonl"))
        rows = [long_doc(60 + 3 * k + m, 120) for m in range(3)]
        rows.insert(1, text)
        with open(files[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "id": f"{k}-{m}"}, ensure_ascii=False) + "\n" for m, t in enumerate(rows))
    clean(files, str(tmp_path / "single"), num_workers=1, progress=False)
    outs = run_shards([[f] for f in files], tmp_path, redis_url, "chain", [2, 1, 0])
    assert sorted(sum((kept_ids(o) for o in outs), [])) == kept_ids(tmp_path / "single")
    assert "1-1" not in kept_ids(tmp_path / "single") and {"0-1", "2-1"} <= set(kept_ids(tmp_path / "single"))
    removed = [json.loads(l) for l in open(tmp_path / "shard1" / "removed.jsonl", encoding="utf-8")]
    assert [(x["doc"], x["dup_of"]) for x in removed] == [(1 * 10 ** 12 + 1, 0 * 10 ** 12 + 1)]  # B -> A, across shards
    assert removed[0]["jaccard"] == pytest.approx(jaccard(a, b), abs=1e-4)


def test_redis_shard_refuses_a_used_prefix_and_a_wrong_shard_id(redis_url, tmp_path):
    import redis
    files = planted_corpus(tmp_path / "in", parts=2)
    redis.Redis.from_url(redis_url).sadd("used:shards", 0)
    with pytest.raises(ValueError, match="already has shard 0"):
        clean(files[:1], str(tmp_path / "o"), redis_url=redis_url, redis_prefix="used", num_shards=2, progress=False)
    with pytest.raises(ValueError, match="shard_id=2"):
        clean(files[:1], str(tmp_path / "o"), redis_url=redis_url, shard_id=2, num_shards=2, progress=False)
    assert not (tmp_path / "o").exists()
