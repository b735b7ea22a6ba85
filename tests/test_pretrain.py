"""pretrain.py as users run it (subprocesses): DDP equivalence, exact resume, NaN stop."""
import json
import os

from conftest import TORCHRUN_2, run_script, write_motif_bins
import pytest
import torch

TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=32", "--batch_size=2",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--num_threads=1",
        "--dtype=float32", "--device=cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_motif_bins(tmp_path_factory.mktemp("bins"), 256, 200, n_motifs=30, max_len=20, n_draws=2000,
                            n_val=4000)


def run(args, launcher=None, check=True, plots=False):
    return run_script("pretrain.py", *args, launcher=launcher, check=check, plots=plots)


def train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def common(data, out_dir, *extra):
    return TINY + [f"--train_data={data / 'train.bin'}", f"--val_data={data / 'val.bin'}",
                   f"--out_dir={out_dir}"] + list(extra)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_double_accumulation(data, tmp_path):
    steps = ["--max_iters=4", "--eval_interval=100", "--gradient_accumulation_steps=4"]
    run(common(data, tmp_path / "single", *steps))
    run(common(data, tmp_path / "ddp", *steps), launcher=TORCHRUN_2)
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == [0, 1, 2, 3]
    for it in single:
        assert abs(single[it] - ddp[it]) <= 1e-5, (it, single[it], ddp[it])
    assert single[3] < single[0]  # it trained, so equal weights are not trivially the initial ones
    w1, w2 = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(data, tmp_path):
    sched = ["--lr_decay_iters=10", "--eval_interval=3", "--gradient_accumulation_steps=2", "--dropout=0.1"]
    run(common(data, tmp_path / "straight", "--max_iters=10", *sched))
    run(common(data, tmp_path / "stopped", "--max_iters=5", *sched))
    first = train_losses(tmp_path / "stopped")
    assert sorted(first) == [0, 1, 2, 3, 4]
    run(common(data, tmp_path / "stopped", "--max_iters=10", "--init_from=resume", *sched))
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert sorted(resumed) == sorted(straight) == list(range(10))
    for it in straight:  # dropout is on: the RNG state must have been restored too
        assert abs(straight[it] - resumed[it]) <= 1e-6, (it, straight[it], resumed[it])
    w1, w2 = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=0), k


def test_checkpoint_loads_with_weights_only_and_records_the_config_used(data, tmp_path):
    run(common(data, tmp_path, "--max_iters=2", "--eval_interval=100"), plots=True)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("model", "optimizer", "model_args", "iter_num", "config", "rng", "data"):
        assert key in ckpt, key
    assert ckpt["iter_num"] == 2 and ckpt["config"]["dim"] == 64
    # derived settings as the run used them, not the 0 meaning "fill in" (lr_decay_iters 0 = max_iters,
    # vocab_size 0 = the token files' meta.json)
    assert ckpt["config"]["lr_decay_iters"] == 2 and ckpt["config"]["vocab_size"] == 256
    assert os.path.exists(tmp_path / "loss.png")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temp file left behind


@pytest.mark.slow  # test_faults.py checks the same, byte for byte, with best.pt too
def test_nan_loss_stops_with_iteration_and_keeps_last_good_checkpoint(data, tmp_path):
    run(common(data, tmp_path, "--max_iters=3", "--eval_interval=1"))
    good = weights(tmp_path)
    # an absurd learning rate makes the weights overflow after the first update
    p = run(common(data, tmp_path, "--max_iters=50", "--eval_interval=1", "--init_from=resume",
                   "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0"), check=False)
    assert p.returncode != 0
    assert "iteration" in p.stderr and ("nan" in p.stderr or "inf" in p.stderr), p.stderr[-2000:]
    after = weights(tmp_path)
    for k in good:
        assert torch.isfinite(after[k]).all(), k


def test_resume_takes_the_checkpoints_architecture_and_context(data, tmp_path):
    """Resumed without the shape flags (the defaults say dim 288, max_seq_len 256), the run continues the
    checkpoint's 64-dim model and draws batches of its max_seq_len 32; asking for another shape is refused."""
    shape = [a for a in TINY if not a.startswith(("--dim", "--max_seq_len"))]
    args = [f"--train_data={data / 'train.bin'}", f"--val_data={data / 'val.bin'}", f"--out_dir={tmp_path}",
            "--eval_interval=100"]
    run(TINY + args + ["--max_iters=2"])
    p = run(shape + args + ["--max_iters=3", "--init_from=resume"])
    # batches of 256 tokens would not even fit the 32-position model; the run says what it draws
    assert "x 2 x 32)" in p.stdout, p.stdout[:500]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["model_args"]["max_seq_len"] == 32
    assert ckpt["config"]["max_seq_len"] == 32 and ckpt["config"]["dim"] == 64
    p = run(shape + args + ["--max_iters=4", "--init_from=resume", "--dim=128"], check=False)
    assert p.returncode != 0 and "dim=128" in p.stderr and "checkpoint: 64" in p.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 3  # nothing written
