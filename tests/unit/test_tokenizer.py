"""tokenizer/: the Tokenizer wrapper and train_tokenizer, on one tiny BPE model trained once per module on a corpus
written into tmp_path. Its command line (python -m tokenizer): tests/scripts/test_tokenizer_cli.py."""
import hashlib
import json
import os
import pickle
import random
import re

import pytest
import sentencepiece as spm

from babyllama.readers import expand_paths
from tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer
import tokenizer.train_tokenizer as tt
from tokenizer.train_tokenizer import MAX_VOCAB, input_items, iter_sentences, train_tokenizer

VOCAB = 600

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model learns to write poems in Chinese and English.",
    "We train the tokenizer on a tiny corpus so that the tests run fast.",
    "    def forward(self, x):  # indented code with  double  spaces",
]

# strings that must survive encode -> decode unchanged
TRICKY = [
    "",
    "床前明月光，疑是地上霜。",
    "Hello, world! The quick brown fox.",
    "家庭：👨‍👩‍👧 and 👋🏽 ok 🇨🇳",  # ZWJ sequence, skin tone modifier, flag
    "CJK ext-B: 𠀀 𪚥 𰻞",
    "日本語のテキスト、한국어 텍스트",
    "∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ, π≈3.14159",
    "\ttab\tseparated\t",
    "  double  spaces ",
    " leading and trailing ",
    "\n\nparagraphs\n\n\nhere\n",
    "2026年11月21日 at 23:59:07, 1234567890",
    "Windows\r\nline\rendings\x00nul\x7f",
    "\u3000全角空格　ＡＢＣ１２３",
    "literal markers ▁ and ▁▁x▁ and  ▁ ",
    "<|user|>hi<|end|><s></s><pad><unk><0x41>",
    "e\u0301 vs é, ﬁ ligature, Ω vs Ω",  # NFKC would change these
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(d / "poems.txt", "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write(rng.choice(POEMS) + "\n")
    with open(d / "mixed.txt", "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write(rng.choice(ENGLISH) + "\n")
            f.write(f"在{rng.randint(1900, 2030)}年{rng.randint(1, 12)}月有{rng.randint(0, 99999)}人，"
                    f"about {rng.randint(0, 10**6)} people and 1000000 stars\n\n")
    return d


@pytest.fixture(scope="module")
def tok(corpus_dir, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    path = train_tokenizer(str(corpus_dir), prefix, VOCAB, num_threads=1, verbose=False)
    return Tokenizer(path)


def test_trained_model_has_requested_vocab_and_only_final_files(tok):
    assert tok.vocab_size == len(tok) == VOCAB
    # trained into a temp prefix then renamed: nothing else is left next to the model
    assert sorted(os.listdir(os.path.dirname(tok.model_path))) == ["tiny.model", "tiny.vocab"]


def test_round_trip_mixed_scripts_emoji_and_rare_chars(tok):
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_random_unicode_fuzz(tok):
    rng = random.Random(1234)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x2000, 0x206F), (0x2580, 0x2582), (0x3000, 0x303F),
              (0x4E00, 0x9FFF), (0xE000, 0xF8FF), (0xFF00, 0xFFFF), (0x1F300, 0x1FAFF), (0x20000, 0x3134F)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(rng.choice(" \t\n") if rng.random() < 0.2 else chr(rng.randint(lo, hi)))
        s = "".join(chars)
        assert tok.decode(tok.encode(s)) == s


def test_decode_agrees_with_sentencepiece_decode(tok):
    # our table-based decode must not drift from sentencepiece's own
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == tok.sp.decode(ids)


def test_ids_are_sentencepiece_ids_but_around_a_literal_space_mark(tok):
    ref = spm.SentencePieceProcessor(model_file=tok.model_path)
    assert tok.kind == "ours"
    for s in TRICKY:
        assert (tok.encode(s) == ref.encode(s)) == ("\u2581" not in s), s


def test_literal_space_mark_is_not_a_space(tok):
    # sentencepiece alone maps U+2581 to " "; the wrapper escapes it to byte-fallback tokens
    assert tok.sp.decode(tok.sp.encode("a\u2581b")) == "a b"
    assert tok.encode("a\u2581b") != tok.encode("a b")
    assert tok.decode(tok.encode("a\u2581b")) == "a\u2581b"


def test_common_text_is_compressed_not_byte_spelled(tok):
    ids = tok.encode("床前明月光，疑是地上霜。")
    assert len(ids) < 12  # merges learned: fewer tokens than characters
    assert not any(tok.sp.is_byte(i) for i in ids)


def test_vocab_over_uint16_refused(tmp_path):
    for bad in (MAX_VOCAB + 1, 100_000):
        with pytest.raises(ValueError, match="uint16"):
            train_tokenizer(iter(["hello world"] * 10), str(tmp_path / "big"), bad, verbose=False)
    assert os.listdir(tmp_path) == []  # refused before any training or file


def test_vocab_too_small_for_specials_and_bytes_refused(tmp_path):
    with pytest.raises(ValueError, match="byte-fallback"):
        train_tokenizer(iter(["hello world"] * 10), str(tmp_path / "small"), 272, verbose=False)


def test_special_ids_reserved_and_distinct(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert list(tok.special) == SPECIAL_TOKENS
    assert list(tok.special.values()) == list(range(4, 4 + len(SPECIAL_TOKENS)))  # fixed ids across vocab sizes
    chat = (tok.system_id, tok.user_id, tok.assistant_id, tok.end_id)
    assert chat == tuple(tok.special[t] for t in SPECIAL_TOKENS[:4])
    ids = [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, *tok.special.values()]
    assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
    for t, i in tok.special.items():
        assert tok.id_to_piece(i) == t
    # special tokens can only be inserted by id, never forged by typing their text
    for t in SPECIAL_TOKENS + ["<s>", "</s>", "<pad>"]:
        assert not set(tok.encode(f"hi {t} there")) & set(ids)
        assert tok.decode(tok.encode(t)) == t


def test_decode_drops_control_tokens(tok):
    text = "明月 moon"
    ids = [tok.bos_id, tok.user_id] + tok.encode(text) + [tok.end_id, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + tok.encode(text) + [tok.eos_id]


def test_decode_rejects_negative_ids(tok):
    with pytest.raises(IndexError):
        tok.decode([5, -100])


def test_digits_are_split(tok):
    # the corpus repeats "1000000" and years: without split_digits these would merge
    for s in ["1000000", "2026年11月21日", "x=31415926"]:
        pieces = [tok.id_to_piece(i) for i in tok.encode(s) if not tok.sp.is_byte(i)]  # "<0x3D>" is "="
        assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces


def test_encode_batch_matches_encode(tok):
    got = tok.encode_batch(TRICKY, bos=True, eos=True, num_threads=2)
    assert got == [tok.encode(s, bos=True, eos=True) for s in TRICKY]
    assert tok.encode_batch([]) == []


def test_stream_decoder_matches_full_decode(tok):
    for s in TRICKY:
        ids = tok.encode(s)
        dec = StreamDecoder(tok)
        assert "".join(dec.put(i) for i in ids) + dec.flush() == tok.decode(ids) == s


def test_stream_decoder_holds_back_partial_utf8_chars(tok):
    ids = tok.encode("𪚥")  # ext-B: not in the corpus, spelled as 4 byte-fallback tokens
    assert len(ids) == 4 and all(tok.sp.is_byte(i) for i in ids)
    dec = StreamDecoder(tok)
    assert [dec.put(i) for i in ids] == ["", "", "", "𪚥"]
    ids = tok.encode("👨‍👩‍👧")  # each code point of the ZWJ sequence appears as soon as it is complete
    out = [dec.put(i) for i in ids]
    assert "".join(out) == "👨‍👩‍👧" and all(o in ("", "👨", "\u200d", "👩", "👧") for o in out)
    # a stream cut mid-character ends in one replacement char, and the decoder is reusable after flush
    dec.put(ids[0])
    assert dec.flush() == "\ufffd"
    assert dec.put(tok.encode("a")[0]) == "a"


def test_missing_model_file_is_clear_error(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(missing)


def test_model_that_cannot_round_trip_is_refused(corpus_dir, tmp_path):
    spm.SentencePieceTrainer.train(input=str(corpus_dir / "poems.txt"), model_prefix=str(tmp_path / "nfkc"),
                                   vocab_size=200, model_type="bpe", minloglevel=2)  # defaults: NFKC, dummy prefix
    with pytest.raises(ValueError, match="round-trip"):
        Tokenizer(tmp_path / "nfkc.model")


def test_sha256_and_pickle(tok):
    with open(tok.model_path, "rb") as f:
        assert tok.sha256() == hashlib.sha256(f.read()).hexdigest()
    tok2 = pickle.loads(pickle.dumps(tok))  # DataLoader / multiprocessing workers
    assert tok2.encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_long_lines_are_chunked_under_max_sentence_length_and_max_chars_stops():
    doc = "字" * 10_000 + "\n\n   \n" + "short line"
    sents = list(iter_sentences([doc], max_sentence_length=1000, max_chars=10**9))
    assert all(len(s.encode()) <= 1000 for s in sents)
    assert "".join(sents) == "字" * 10_000 + "short line"
    stats = {}
    sents = list(iter_sentences([doc] * 100, max_sentence_length=1000, max_chars=2500, stats=stats))
    assert 2500 <= stats["chars"] < 2500 + 250 and stats["sentences"] == len(sents)


def test_input_spec_accepts_files_globs_and_dirs(corpus_dir):
    both = [str(corpus_dir / "mixed.txt"), str(corpus_dir / "poems.txt")]

    def files(spec):  # what the tokenizer reads: its checked items, expanded by the readers
        return [path for path, _ in expand_paths(input_items(spec))]
    assert files(str(corpus_dir)) == both
    assert files(str(corpus_dir / "*.txt")) == both
    assert files(",".join(both)) == both
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        input_items(f"{both[0]},{corpus_dir / 'missing.txt'}")


def test_txt_training_from_a_glob_round_trips(corpus_dir, tmp_path):
    path = train_tokenizer(str(corpus_dir / "*.txt"), str(tmp_path / "t"), 500, num_threads=1, verbose=False)
    assert Tokenizer(path).decode(Tokenizer(path).encode(TRICKY[4])) == TRICKY[4]


def test_jsonl_training_through_shared_readers(corpus_dir, tmp_path):
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for line in (corpus_dir / "poems.txt").read_text(encoding="utf-8").splitlines()[:50]:
            f.write(json.dumps({"text": line + "\nHello world 42"}, ensure_ascii=False) + "\n")
    path = train_tokenizer(str(tmp_path / "docs.jsonl"), str(tmp_path / "j"), 400, num_threads=1, verbose=False)
    tok = Tokenizer(path)
    assert len(tok.encode("床前明月光")) < 5


def test_sentence_sample_is_seeded_uniform_and_in_stream_order():
    lines = [f"line {i}" for i in range(10_000)]
    a = tt.sample_sentences(iter(lines), 1000, seed=1)
    assert a == tt.sample_sentences(iter(lines), 1000, seed=1) != tt.sample_sentences(iter(lines), 1000, seed=2)
    assert len(a) == len(set(a)) == 1000 and a == sorted(a, key=lambda s: int(s.split()[1]))  # stream order
    # uniform: each tenth of the stream holds ~100 of the 1000 (binomial sd ~9.5: 60..140 is > 4 sd)
    tenths = [sum(1 for s in a if int(s.split()[1]) // 1000 == k) for k in range(10)]
    assert all(60 <= n <= 140 for n in tenths), tenths
    assert tt.sample_sentences(iter(lines[:5]), 1000, seed=1) == lines[:5]  # fewer than size: all of them


def test_training_twice_gives_the_same_file(corpus_dir, tmp_path):
    # a sample smaller than the input, as on a real corpus; the model file records its prefix, so same prefix
    one = train_tokenizer(str(corpus_dir), str(tmp_path / "a" / "t"), VOCAB, num_threads=2, input_sentence_size=300)
    with open(one, "rb") as f:
        first = f.read()
    again = train_tokenizer(str(corpus_dir), str(tmp_path / "a" / "t"), VOCAB, num_threads=2, input_sentence_size=300)
    with open(again, "rb") as f:
        assert f.read() == first


SMALL_CORPUS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "Hello, world! 2026年"] * 5  # allows < 2,000 pieces


def test_a_vocab_too_large_for_the_corpus_says_the_largest_it_allows_and_that_one_trains(tmp_path):
    with pytest.raises(ValueError) as e:
        train_tokenizer(iter(SMALL_CORPUS), str(tmp_path / "big"), 2000, num_threads=1)
    message = str(e.value)
    assert "\n" not in message
    largest = int(re.fullmatch(r"vocab_size=2000 is too large for this corpus: it allows at most (\d+) pieces "
                               r"\(set --vocab_size=\1 or less, or train on more text\)", message)[1])
    assert 272 < largest < 2000  # more than the fixed pieces (specials and 256 bytes), fewer than asked
    train_tokenizer(iter(SMALL_CORPUS), str(tmp_path / "largest"), largest, num_threads=1)  # the largest trains
    with pytest.raises(ValueError, match=f"at most {largest} pieces"):
        train_tokenizer(iter(SMALL_CORPUS), str(tmp_path / "one_more"), largest + 1, num_threads=1)
    assert not list(tmp_path.glob("big*")) and not list(tmp_path.glob("one_more*"))  # nothing half written


SPACE_FREE = ["".join(random.Random(k).choice("床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流，。")
                      for _ in range(8 + k % 13)) for k in range(200)]  # 200 short Chinese lines, not one space
PROBE = " two  spaces,\ttab\nnewline English 😀 ▁ 全角　中文 "


def test_space_free_corpus_gives_a_tokenizer_that_loads_and_round_trips(tmp_path):
    # sentencepiece alone, with our options, leaves "▁" out: a space would come back as "▁"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPACE_FREE), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "plain.model"))
    assert plain.decode(plain.encode(" ")) == "\u2581"
    path = train_tokenizer(iter(SPACE_FREE), str(tmp_path / "zh"), VOCAB, num_threads=1)
    tok = Tokenizer(path)
    assert tok.kind == "ours" and tok.vocab_size == VOCAB
    assert tok.decode(tok.encode(PROBE)) == PROBE
    assert tok.sp.decode(tok.sp.encode(" a  b")) == " a  b"  # sentencepiece's own view agrees: the space is a piece
    assert list(tok.special.values()) == list(range(4, 4 + len(SPECIAL_TOKENS)))
    from_files = tmp_path / "zh.txt"  # the same from a file, read twice, unsampled
    from_files.write_text("\n".join(SPACE_FREE) + "\n", encoding="utf-8")
    path = train_tokenizer(str(from_files), str(tmp_path / "zh_file"), VOCAB, num_threads=1, input_sentence_size=0)
    assert Tokenizer(path).decode(Tokenizer(path).encode(PROBE)) == PROBE


def test_space_free_one_shot_stream_unsampled_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="spaces"):
        train_tokenizer(iter(SPACE_FREE), str(tmp_path / "out" / "zh"), VOCAB, num_threads=1, input_sentence_size=0)
    assert os.listdir(tmp_path / "out") == []  # neither the model nor its .tmp files
