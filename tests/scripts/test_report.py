"""report.py: a run's report card from the files its stages wrote."""
import json
import os

from conftest import run_script


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


def test_report_of_demo_zh_scores_every_model_against_the_baselines_on_held_out_questions(tmp_path):
    d = tmp_path / "zh"
    run_s = dict(train_tokens=1_000_000, train_seconds=120.0, warmup_seconds=3.0, tokens_per_sec=8333.3)
    write(f"{d}/pretrain/summary.json", dict(iter=500, params=6_100_000, best_val_loss=5.4321, **run_s))
    write(f"{d}/medical/summary.json", dict(iter=300, params=6_100_000, best_val_loss=4.9876, **run_s))
    scores = lambda b4: dict(n=200, bleu1=40.0, bleu2=30.0, bleu3=20.0, bleu4=b4, rougeL=50.0, chrf=25.0)  # noqa: E731
    clean = dict(scores(1.5), n=172, baselines={"nearest": dict(scores(6.0), n=172)})
    base = {"qa": dict(scores(1.0), baselines={"nearest": scores(7.5)}, uncontaminated=clean),
            "pairs": dict(scores(2.0), baselines={"copy": scores(21.0)})}
    write(f"{d}/medical/chat.json", {"chat_scores": base})
    write(f"{d}/sft/chat.json", {"chat_scores": {"qa": dict(base["qa"], bleu4=3.25), "pairs": dict(base["pairs"], bleu4=24.5)}})
    write(f"{d}/sft/answers.jsonl", [{"kind": "qa", "question": "头晕怎么办？", "answer": "多休息。", "reference": "测血压。"},
                                     {"kind": "pairs", "question": "把下面的文言文翻译成现代文：\n学而时习之",
                                      "answer": "学习并时常温习", "reference": "学习了并且按时温习它"}])
    for stage in ("pretrain", "medical"):
        write(f"{d}/{stage}/eval_ppl.json", dict(val_data="zh/val.bin", val_tokens=1000, val_loss=5.0, perplexity=148.4,
                                                 bits_per_char=3.21))
    write(f"{d}/pretrain/log.jsonl", [{"iter": 0, "val_loss": 9.0}, {"iter": 0, "loss": 9.1}, {"iter": 100, "val_loss": 7.0}])
    cloze = lambda a: dict(benchmark="cloze", split="val", k_shot=0, questions=400, scores={"option": {  # noqa: E731
        "subjects": {"next_sentence": a}, "categories": {"modern Chinese": a}, "average": a, "questions": 400}})
    write(f"{d}/pretrain/eval_mc_cloze_val_0shot.json", cloze(0.4))
    write(f"{d}/medical/eval_ppl_medical.json", dict(val_data="med/val.bin", val_tokens=500, val_loss=4.0,
                                                     perplexity=54.6, bits_per_char=2.5))
    run_script("report.py", f"--run_dir={d}")
    text = (d / "report.md").read_text(encoding="utf-8")
    assert "### Held-out doctor questions" in text and "### Held-out classical -> modern translation" in text
    assert "| baseline: nearest | 40.00 | 30.00 | 20.00 | 7.50 | 50.00 | 25.00 | 200 |" in text
    assert "| baseline: copy | 40.00 | 30.00 | 20.00 | 21.00 | 50.00 | 25.00 | 200 |" in text
    assert "| after medical pretraining | 40.00 | 30.00 | 20.00 | 2.00 |" in text
    assert "| after SFT | 40.00 | 30.00 | 20.00 | 24.50 |" in text
    assert "| medical pretraining | 300 |" in text and "4.9876" in text
    assert "| after medical pretraining (medical text) | med/val.bin | 500 |" in text
    assert "Q: 把下面的文言文翻译成现代文： / 学而时习之" in text and "reference: 学习了并且按时温习它" in text
    assert "well-formed poems" not in text  # no poetry table for a run without poems
    # the doctor table again without the 28 questions contamination.py flagged, baseline included
    assert "Without the 28 questions" in text and "| baseline: nearest | 40.00 | 30.00 | 20.00 | 6.00 |" in text
    assert "| after medical pretraining | 40.00 | 30.00 | 20.00 | 1.50 |" in text
    assert "Held-out loss through pretraining, by iteration: 0: 9.000, 100: 7.000." in text
    # 400 questions: chance 25% plus two standard errors, 2 x sqrt(0.25 x 0.75 / 400) = 4.33 points
    assert "| pretrained | option | 40.0 | 40.0 |" in text and "a score above 29.3% is more than two" in text
