"""python -m tokenizer as users run it: configurator overrides reach the training, one summary line by default and
sentencepiece's whole log on request."""
import re

from conftest import TEXTS, run_script

from tokenizer import Tokenizer


def test_cli_trains_with_configurator_overrides(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, name in enumerate(("poems.txt", "mixed.txt")):
        (corpus / name).write_text("\n".join(TEXTS[k::2]) + "\n", encoding="utf-8")
    prefix = tmp_path / "cli" / "tok"
    r = run_script("-m", "tokenizer", f"--input={corpus / 'poems.txt'},{corpus / 'mixed.txt'}",
                   "--vocab_size=400", f"--model_prefix={prefix}", "--num_threads=1", timeout=60)
    assert Tokenizer(f"{prefix}.model").vocab_size == 400
    # quiet by default: one summary line, none of sentencepiece's ~360 lines of log
    assert "tokenizer: 400 pieces" in r.stdout and len((r.stdout + r.stderr).splitlines()) < 10
    r = run_script("-m", "tokenizer", f"--input={corpus}", "--vocab_size=400", f"--model_prefix={prefix}",
                   "--num_threads=1", "--verbose=True", timeout=60)
    assert "sample" in r.stdout and "trainer_interface" in r.stderr  # the whole log on request


SMALL_CORPUS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "Hello, world! 2026年"] * 5


def test_cli_says_a_vocab_too_large_for_the_corpus_in_one_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(SMALL_CORPUS), encoding="utf-8")
    p = run_script("-m", "tokenizer", f"--input={tmp_path / 'corpus.txt'}", "--vocab_size=2000",
                   f"--model_prefix={tmp_path / 'tok'}", "--num_threads=1", check=False)
    assert p.returncode == 1
    assert re.fullmatch(r"error: vocab_size=2000 is too large for this corpus: it allows at most \d+ pieces .*\n",
                        p.stderr)
