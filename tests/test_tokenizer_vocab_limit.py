"""A tokenizer vocabulary too large for its corpus is refused in one line that says the largest vocabulary the
corpus allows (sentencepiece's "Vocabulary size too high (N). Please set it to a value <= M.", read), and that
largest value trains."""
import re

from conftest import run_script
import pytest

from tokenizer.train_tokenizer import train_tokenizer

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "Hello, world! 2026年"] * 5


def test_a_vocab_too_large_for_the_corpus_says_the_largest_it_allows_and_that_one_trains(tmp_path):
    with pytest.raises(ValueError) as e:
        train_tokenizer(iter(TEXTS), str(tmp_path / "big"), 2000, num_threads=1)
    message = str(e.value)
    assert "\n" not in message
    largest = int(re.fullmatch(r"vocab_size=2000 is too large for this corpus: it allows at most (\d+) pieces "
                               r"\(set --vocab_size=\1 or less, or train on more text\)", message)[1])
    assert 272 < largest < 2000  # more than the fixed pieces (specials and 256 bytes), fewer than asked
    train_tokenizer(iter(TEXTS), str(tmp_path / "largest"), largest, num_threads=1)  # the largest trains
    with pytest.raises(ValueError, match=f"at most {largest} pieces"):
        train_tokenizer(iter(TEXTS), str(tmp_path / "one_more"), largest + 1, num_threads=1)
    assert not list(tmp_path.glob("big*")) and not list(tmp_path.glob("one_more*"))  # nothing half written


def test_the_command_line_says_it_in_one_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    p = run_script("-m", "tokenizer", f"--input={tmp_path / 'corpus.txt'}", "--vocab_size=2000",
                   f"--model_prefix={tmp_path / 'tok'}", "--num_threads=1", check=False)
    assert p.returncode == 1
    assert re.fullmatch(r"error: vocab_size=2000 is too large for this corpus: it allows at most \d+ pieces .*\n",
                        p.stderr)
