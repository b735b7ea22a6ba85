"""The demo's promises: the precision/compile fast path follows the CPU's features, the demo recipe trains the
same model whatever the thread count, progress timing leaves the warm-up out, and the summary has its sections."""
import json
import os

from conftest import run_script, write_motif_bins
import pytest

from babyllama import checkpoint as ck, configurator, dist, precision, runlog

AMX_XEON = dict(capability="AVX512", amx=True, avx512_bf16=True)
ZEN4 = dict(capability="AVX512", amx=False, avx512_bf16=True)
AVX2_ONLY = dict(capability="AVX2", amx=False, avx512_bf16=False)
ZEN4_FORCED_AVX2 = dict(capability="AVX2", amx=False, avx512_bf16=True)  # ATEN_CPU_CAPABILITY=avx2


def test_cpu_fast_path_takes_bf16_only_where_the_cpu_multiplies_bf16_in_hardware():
    assert precision.cpu_fast_path(AMX_XEON)[:2] == ("bfloat16", True)
    assert precision.cpu_fast_path(ZEN4)[:2] == ("bfloat16", True)
    assert precision.cpu_fast_path(ZEN4, fixed_shapes=False)[:2] == ("bfloat16", False)  # padded batches: no compile
    assert precision.cpu_fast_path(AVX2_ONLY)[:2] == ("float32", False)
    assert precision.cpu_fast_path(ZEN4_FORCED_AVX2)[:2] == ("float32", False)  # the kernels in use decide
    assert "no bf16 matrix units" in precision.cpu_fast_path(AVX2_ONLY)[2]


@pytest.mark.parametrize("features, dtype, compiled", [(AMX_XEON, "bfloat16", True), (AVX2_ONLY, "float32", False)])
def test_auto_settings_follow_the_probed_features(monkeypatch, features, dtype, compiled):
    monkeypatch.setattr(precision, "cpu_features", lambda: features)
    assert precision.resolve_dtype("auto", "cpu") == dtype
    assert precision.resolve_compile("auto", "cpu", dtype) is compiled
    assert precision.resolve_compile("auto", "cpu", dtype, fixed_shapes=False) is False
    assert precision.resolve_compile("auto", "cpu", "float16") is False  # another precision: off the measured path
    assert precision.resolve_dtype("float32", "cpu") == "float32" and precision.resolve_compile(True, "cpu", "float32") is True
    assert precision.describe_path("cpu", dtype, compiled).endswith(precision.cpu_fast_path(features)[2])
    with pytest.raises(SystemExit, match="compile must be True, False or 'auto'"):
        precision.resolve_compile("yes", "cpu", dtype)


def test_an_auto_setting_takes_a_bool_override_and_nothing_else():
    g = {"compile": "auto", "__name__": "x"}
    configurator.apply_overrides(g, ["--compile=False"], verbose=False)
    assert g["compile"] is False
    with pytest.raises(ValueError, match="expected str"):
        configurator.apply_overrides({"compile": "auto"}, ["--compile=3"], verbose=False)


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


def test_a_time_boxed_stop_right_after_an_evaluation_does_not_evaluate_again(tmp_path):
    run = dist.setup_run("cpu", "float32", 0, 1, str(tmp_path))
    c = ck.Checkpointer(str(tmp_path / "ckpt.pt"), None, run, None, None, None, 200, True)
    c.evaluated_at = 400  # what after_eval records
    assert c.eval_due(400, False) and c.eval_due(600, False)
    assert not c.eval_due(401, last=True)  # stopped by max_minutes one step after the evaluation at 400
    assert c.eval_due(402, last=True)  # training since: evaluate the end


def test_smoothed_curve_is_a_bias_corrected_moving_average():
    assert runlog.smooth([3.0] * 50) == pytest.approx([3.0] * 50)  # no pull toward 0 at the start
    out = runlog.smooth([0.0, 1.0], beta=0.5)
    assert out == pytest.approx([0.0, 0.5 * 1.0 / 0.75])  # EMA 0.25 after two steps, / (1 - 0.5^2)


# ---- the demo recipe: the same losses with 1 and 2 threads ------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory):
    """Token files shaped like the demo's (vocab 8,000) with structure to learn: motifs in random order."""
    return write_motif_bins(tmp_path_factory.mktemp("demo_bins"), 8000, 8000, n_motifs=200, max_len=30,
                            n_draws=3000, n_val=20_000)


def demo_losses(data, out_dir, threads, dtype):
    run_script("pretrain.py", "config/demo_cpu.py", f"--train_data={data / 'train.bin'}",
               f"--val_data={data / 'val.bin'}", f"--out_dir={out_dir}", "--max_iters=4", "--eval_iters=1",
               f"--num_threads={threads}", f"--dtype={dtype}", "--compile=False", "--warmup_iters=1")
    rows = runlog.read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


# float32: a sum taken in another order (other threads, other SIMD widths) differs in the 7th digit; over 4
# steps that stays far below 1e-4 nats. bfloat16 autocast rounds every matmul output to 8 bits of mantissa
# (relative 4e-3), so a changed summation order can flip roundings: 2e-2 nats.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_recipe_trains_the_same_model_with_one_or_two_threads(demo_tokens, tmp_path, dtype):
    if dtype == "bfloat16" and precision.cpu_fast_path(precision.cpu_features())[0] != "bfloat16":
        pytest.skip("bf16 is not this CPU's fast path: the demo trains in fp32 here")
    one = demo_losses(demo_tokens, tmp_path / "t1", 1, dtype)
    two = demo_losses(demo_tokens, tmp_path / "t2", 2, dtype)
    assert len(one[0]) == len(two[0]) == 4
    assert one[0][-1] < one[0][0] - 0.1  # it trained: equal losses are not the untouched initial model's
    for a, b in zip(one[0] + one[1], two[0] + two[1]):
        assert abs(a - b) <= TOLERANCE[dtype], (one, two)


# ---- the summary ------------------------------------------------------------------------------------------

def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(obj, list):
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj))
        else:
            json.dump(obj, f, ensure_ascii=False)


def mc_result(avg_letter, avg_option):
    subj = lambda a: {"subjects": {"next_line": a - 0.05, "author": a + 0.05}, "categories": {"poetry": a},
                      "average": a, "questions": 1000}
    return dict(benchmark="poetry_bench", split="val", k_shot=0, questions=1000, contaminated=3,
                scores={"letter": subj(avg_letter), "option": subj(avg_option)})


def test_report_has_the_losses_curves_evaluations_scores_samples_and_files(tmp_path):
    d = tmp_path / "demo"
    run_s = dict(train_tokens=1_000_000, train_seconds=120.0, warmup_seconds=3.0, tokens_per_sec=8333.3)
    write(f"{d}/stages.jsonl", [{"stage": "pretrain", "seconds": 125.0}, {"stage": "sft", "seconds": 60.0}])
    write(f"{d}/pretrain/summary.json", dict(iter=500, params=6_100_000, best_val_loss=5.4321, **run_s))
    write(f"{d}/pretrain/eval.json", dict(val_loss=5.5, perplexity=244.7, val_tokens=150_000,
                                          samples=[{"prompt": "白日依山尽，", "completion": "黄河入海流。"}]))
    write(f"{d}/sft/summary.json", dict(iter=300, best_val_loss=3.2109, **run_s))
    poem = {"n": 200, "exact_match": 0.0, "finished": 0.99, "well_formed": 0.875}
    write(f"{d}/sft/chat.json", {"chat_scores": {"poem": poem, "author": {"n": 200, "exact_match": 0.01,
                                                                          "author_named": 0.02}}})
    write(f"{d}/pretrain/chat.json", {"chat_scores": {"poem": dict(poem, well_formed=0.0)}})
    write(f"{d}/sft/answers.jsonl", [{"kind": "poem", "question": "请写一首题为《春》的诗。", "answer": "春风吹绿柳，"}])
    write(f"{d}/dpo/summary.json", dict(iter=80, held_out={"pairs": 100, "before": {"logps/accuracy": 0.66,
          "logps/margin": 1.0}, "after": {"logps/accuracy": 0.71, "logps/margin": 2.0}}, **run_s))
    write(f"{d}/pretrain/eval_mc_poetry_bench_val_0shot.json", mc_result(0.25, 0.40))
    write(f"{d}/sft/eval_mc_poetry_bench_val_0shot.json", mc_result(0.30, 0.45))
    write(f"{d}/pretrain/eval_ppl.json", dict(val_data="v.bin", val_tokens=1000, val_loss=5.0, perplexity=148.4,
                                              bits_per_char=3.21))
    write(f"{d}/bench/contamination.json", dict(eval_set="bench", markdown="| flagged table |"))
    (d / "pretrain" / "loss.png").write_bytes(b"png")
    run_script("report.py", f"--run_dir={d}")
    text = (d / "report.md").read_text(encoding="utf-8")
    for section in ("## Wall time per stage", "## Training", "## Curves", "## Evaluations", "## Held-out scores",
                    "## Continuations", "## Chat answers after SFT", "## Files"):
        assert section in text, section
    assert "![pretraining loss](pretrain/loss.png)" in text and "sft/loss.png" not in text  # only plots that exist
    assert "| pretrained | letter | 30.0 | 20.0 | 25.0 |" in text  # subjects sorted: author, next_line; average
    assert "| after SFT | option | 50.0 | 40.0 | 45.0 |" in text and "chance is 25%" in text
    assert "| pretrained | v.bin | 1,000 | 5.0000 | 148.40 | 3.2100 |" in text
    assert "| flagged table |" in text and "near-duplicate in the training data: 3 of 1000" in text
    assert "| pretraining | 500 | 1,000,000 |" in text and "5.4321" in text and "3.2109" in text  # losses
    assert "val loss 5.5000" in text and "6.10M-parameter" in text
    assert "| after SFT | 87.5% |" in text and "| base (before SFT) | 0.0% |" in text  # scores
    assert "66.0% before -> 71.0% after" in text
    assert "白日依山尽，**黄河入海流。**" in text and "春风吹绿柳" in text  # samples
    assert "**3.1 min**" in text  # 185 s of stages
