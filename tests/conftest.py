"""What the tests share: the repository root on sys.path, the environment for subprocess runs, and one runner
for the scripts as users run them (python SCRIPT --key=value ...)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# one thread per process: two processes x two threads on two cores spin-wait each other into the ground
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
# no loss plots (matplotlib's start-up costs ~1 s of CPU per training run) except where a test asks for them
ENV["BABYLLAMA_PLOTS"] = "0"
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_script(script, *args, launcher=None, check=True, input=None, timeout=300, plots=False):
    """Run a repository script (e.g. "pretrain.py" or "-m", "clean_data") in a fresh interpreter from the
    repository root, the way a user would (plots: also draw the loss PNGs). Returns the CompletedProcess; with
    check, a non-zero exit fails the test showing the end of stdout and stderr."""
    cmd = (launcher or [sys.executable]) + [script, *map(str, args)]
    env = dict(ENV, BABYLLAMA_PLOTS="1") if plots else ENV
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def write_motif_bins(d, vocab_size, top_id, n_motifs, max_len, n_draws, n_val):
    """train.bin, val.bin (its first n_val tokens) and meta.json (vocab_size) in folder d: a token corpus with
    structure to learn, n_draws motifs (5..max_len-1 ids in 4..top_id-1) drawn from n_motifs in random order."""
    import json

    import numpy as np
    rng = np.random.default_rng(0)
    motifs = [rng.integers(4, top_id, size=rng.integers(5, max_len)) for _ in range(n_motifs)]
    stream = np.concatenate([motifs[i] for i in rng.integers(0, n_motifs, size=n_draws)]).astype(np.uint16)
    stream.tofile(d / "train.bin")
    stream[:n_val].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return d


@pytest.fixture
def single_thread():
    """One intra-op thread while the test runs (then the setting it found): for tiny models, more threads only
    spin-wait on a shared 2-core box (the overfit test: 45 s with 2 threads, 4 s with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
