"""bench.py as users run it: the memory estimate (model.training_memory) is within 15% of the measured peak; the
rollout benchmark times a group as one batch against one reply at a time."""
import re

from conftest import run_script
import pytest


@pytest.mark.parametrize("shape", [
    ["--dim=128", "--n_layers=4", "--n_heads=4", "--vocab_size=2048", "--batch_size=32"],
    ["--dim=192", "--n_layers=3", "--n_heads=4", "--n_kv_heads=2", "--tie_embeddings=False", "--vocab_size=4096",
     "--batch_size=32", "--activation_checkpointing=True"]], ids=["tied", "untied-gqa-checkpointed"])
def test_memory_estimate_is_within_15_percent_of_the_measured_peak(shape):
    # the peak resident set's rise over two training steps (the second with AdamW's state) against
    # model.training_memory for the same set-up, as bench.py prints them
    out = run_script("bench.py", *shape, "--max_seq_len=128", "--measure=True", "--skip_gen=True", "--steps=1",
                     "--warmup_steps=1", "--compile=False", "--dtype=float32", "--num_threads=1").stdout
    line = next(x for x in out.splitlines() if x.startswith("memory: measured"))
    ratio = float(line.rsplit("=", 1)[1])
    assert 0.85 <= ratio <= 1.15, line


def test_bench_times_a_group_as_one_batch_against_one_reply_at_a_time():
    out = run_script("bench.py", "--rollout=True", "--skip_train=True", "--skip_gen=True", "--dim=32", "--n_layers=1",
                     "--n_heads=2", "--vocab_size=64", "--max_seq_len=32", "--rollout_group=2",
                     "--rollout_new_tokens=4", "--rollout_runs=1", "--num_threads=1", "--compile=False",
                     "--dtype=float32").stdout
    assert re.search(r"rollout: a group of 2 as one batch [\d,]+ tokens/s, one at a time [\d,]+ tokens/s", out)

