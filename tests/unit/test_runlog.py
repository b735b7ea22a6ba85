"""babyllama/runlog.py: a resumed log keeps no row twice (nor a line cut short by a kill), the step timer keeps the
warm-up out of tokens per second, and the plotted curve is a bias-corrected moving average."""
import pytest

from babyllama import runlog


def test_resumed_log_keeps_no_row_twice(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = runlog.JsonlLog(path)
    for it in range(7):  # a run killed at iteration 6 whose last checkpoint is iteration 4
        if it % 2 == 0:
            log.write(iter=it, val_loss=5.0 - it)
            log.write(iter=it, checkpoint="ckpt.pt")
        log.write(iter=it, loss=6.0 - it)
    log.close()
    with open(path, "a") as f:
        f.write('{"iter": 7, "lo')  # the kill cut the last line short
    log = runlog.JsonlLog(path, resume_from=4)
    for it in range(4, 6):
        log.write(iter=it, loss=1.0)
    log.close()
    rows = runlog.read_jsonl(path)
    train = [r["iter"] for r in rows if "loss" in r]
    assert train == [0, 1, 2, 3, 4, 5]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]


def test_step_timer_keeps_the_first_iterations_warm_up_out_of_tokens_per_second():
    now = [0.0]
    timer = runlog.StepTimer(clock=lambda: now[0])
    for dt in (30.0, 0.5, 0.5, 0.5):  # a compile warm-up, then three real iterations
        now[0] += dt
        timer.lap(1000)
    assert timer.warmup_seconds == 30.0 and timer.seconds == 1.5 and timer.tokens == 3000
    now[0] += 60.0  # an evaluation
    timer.skip()
    now[0] += 0.5
    assert timer.lap(1000) == 0.5
    assert runlog.throughput(timer, "cpu")["tokens_per_sec"] == 2000.0


def test_smoothed_curve_is_a_bias_corrected_moving_average():
    assert runlog.smooth([3.0] * 50) == pytest.approx([3.0] * 50)  # no pull toward 0 at the start
    out = runlog.smooth([0.0, 1.0], beta=0.5)
    assert out == pytest.approx([0.0, 0.5 * 1.0 / 0.75])  # EMA 0.25 after two steps, / (1 - 0.5^2)
