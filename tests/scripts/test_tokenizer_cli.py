"""python -m tokenizer as users run it: configurator overrides reach the training, one summary line by default and
sentencepiece's whole log on request."""
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
