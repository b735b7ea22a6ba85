"""clean_data/: filters, normalisation, exact/MinHash/SimHash dedup, the pipeline's parquet and report,
merging, data_process on the cleaned parquet, and the Redis-shared index against a real redis-server."""
import json
import os
import random
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from clean_data import dedup, filters
from clean_data.clean import clean
from clean_data.merge import merge, plan
from clean_data.normalize import normalize
from conftest import run_script

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
    from simhash import Simhash
    text = long_doc(5, 80)
    feats = [text[i:i + 5] for i in range(len(text) - 4)]
    hashes, counts = dedup.shingle_hashes([text], 5)
    ours = int(dedup.simhash_fingerprints(hashes, counts)[0])
    table = {f: int(dedup.shingle_hashes_of(f)[0]) for f in feats}
    ref = Simhash(feats, f=64, hashfunc=lambda b: table.get(b.decode(), 0))
    assert ours == ref.value


def test_minhash_estimates_jaccard():
    perms = dedup.permutations(256)
    base = long_doc(7)
    for k in (5, 20, 60):
        other = edit(base, k)
        h, c = dedup.shingle_hashes([normalize(base), normalize(other)])
        sig = dedup.minhash_signatures(h, c, perms)
        assert abs(np.mean(sig[0] == sig[1]) - jaccard(base, other)) < 0.08


@pytest.mark.parametrize("method", ["minhash", "simhash"])
def test_near_dup_caught_and_reordered_text_kept(method):
    base = long_doc(11, 600)
    near = edit(base, 2)  # a few characters edited in a long document
    reordered = shuffled_sentences(base)  # same characters, different order
    assert jaccard(base, near) > 0.9 and jaccard(base, reordered) < 0.2
    assert sorted(base) == sorted(reordered)  # single-character shingles would call these identical
    texts = [normalize(t) for t in (base, near, reordered)]
    h, c = dedup.shingle_hashes(texts)
    if method == "minhash":
        index, keys = dedup.MinHashDedup(0.8, 128), dedup.minhash_signatures(h, c, dedup.permutations(128))
    else:
        index, keys = dedup.SimHashDedup(3), dedup.simhash_fingerprints(h, c)
    assert index.check_and_add(keys[0], 0) is None
    assert index.check_and_add(keys[1], 1) == 0  # the near-duplicate points at the first of its cluster
    assert index.check_and_add(keys[2], 2) is None


def test_exact_dedup_on_normalised_text():
    ex = dedup.ExactDedup()
    assert ex.check_and_add(dedup.exact_key(normalize("白日依山尽，黄河入海流。")), 0) is None
    assert ex.check_and_add(dedup.exact_key(normalize("白日依山尽 黄河入海流")), 1) == 0
    assert ex.check_and_add(dedup.exact_key(normalize("白日依山尽，长江入海流。")), 2) is None


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
    import pyarrow.parquet as pq
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


def test_command_line_overrides_reach_the_pipeline(tmp_path):
    docs = [long_doc(i, 60) for i in range(3)] + [long_doc(99, 15)]  # the last one passes the default min_chars 10
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    run_script("-m", "clean_data", f"--input={tmp_path / 'in.jsonl'}", f"--out_dir={tmp_path / 'out'}",
               "--num_workers=1", "--min_chars=20", "--stages=filter,exact", timeout=60)
    r = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert r["config"]["min_chars"] == 20 and r["config"]["num_workers"] == 1
    assert r["stages"]["filter"]["removed_by"] == {"too_short": 1} and r["documents_out"] == 3
    assert list(r["stages"]) == ["filter", "exact"]


def test_data_process_reads_cleaned_parquet(cleaned, tmp_path):
    import data_process
    from tokenizer.train_tokenizer import train_tokenizer
    d, docs, r = cleaned
    texts = docs * 5 + [COMMON] * 5 + ["the quick brown fox jumps over the lazy dog, a b"] * 50
    model = train_tokenizer(iter(texts), str(tmp_path / "tiny"), 1000, character_coverage=1.0,
                            verbose=False)
    meta = data_process.process(str(d / "out" / "clean.parquet"), model, str(tmp_path / "tok"),
                                num_workers=1, progress=False, verbose=False, val_fraction=0.0)
    assert meta["documents_read"] == r["documents_out"]  # every cleaned row read back as a document
    assert meta["train_documents"] == r["documents_out"]
    assert os.path.getsize(tmp_path / "tok" / "train.bin") > 0


# ---- merging --------------------------------------------------------------------------------------------

def test_merge_ratios_hold_and_are_deterministic(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


def test_two_workers_share_one_redis_index(redis_url, tmp_path):
    docs = [long_doc(100 + i, 200) for i in range(20)]
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    with open(tmp_path / "w1" / "a.jsonl", "w", encoding="utf-8") as f:
        for t in docs[:10]:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    with open(tmp_path / "w2" / "b.jsonl", "w", encoding="utf-8") as f:  # near and exact dups of shard 1
        for t in [edit(docs[0], 3), docs[1]] + docs[10:]:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    kw = dict(redis_url=redis_url, redis_prefix="t", num_workers=1, progress=False, stages="filter,exact,minhash")
    r1 = clean(str(tmp_path / "w1"), str(tmp_path / "o1"), shard_id=1, **kw)
    r2 = clean(str(tmp_path / "w2"), str(tmp_path / "o2"), shard_id=2, **kw)
    assert r1["documents_out"] == 10
    assert r2["stages"]["exact"]["removed"] == 1 and r2["stages"]["minhash"]["removed"] == 1
    removed = [json.loads(l) for l in open(tmp_path / "o2" / "removed.jsonl", encoding="utf-8")]
    assert {x["dup_of"] for x in removed} == {1 * 10 ** 12 + 0, 1 * 10 ** 12 + 1}  # ids from the other worker


def test_minhash_candidates_are_verified_by_exact_jaccard():
    # two documents whose signatures agree completely (estimate 1.0) but whose shingle sets overlap by a third:
    # with the shingle sets given, exact Jaccard decides and they are not merged; without them the estimate does
    import numpy as np
    from clean_data import dedup
    sig = np.arange(128, dtype=np.uint32)
    a, b = np.arange(0, 100, dtype=np.uint64), np.arange(50, 150, dtype=np.uint64)  # J = 50 / 150
    index = dedup.MinHashDedup(threshold=0.8, num_perm=128)
    assert index.check_and_add(sig, "a", a) is None
    assert index.check_and_add(sig.copy(), "b", b) is None
    near = np.arange(0, 105, dtype=np.uint64)  # J with a = 100 / 105 >= 0.8
    assert index.check_and_add(sig.copy(), "c", near) == "a"
    estimate_only = dedup.MinHashDedup(threshold=0.8, num_perm=128)
    estimate_only.check_and_add(sig, "a")
    assert estimate_only.check_and_add(sig.copy(), "b") == "a"
