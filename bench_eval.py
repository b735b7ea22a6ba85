"""
Speed of multiple-choice scoring: questions per second one prompt at a time against batched, with and without
the shared-prefix KV cache, on the same questions in one run (so the ratios hold on a noisy machine). The
predictions of every variant are compared with the one-at-a-time ones.

    python bench_eval.py                                   # the demo model on C-Eval val (../shared/data)
    python bench_eval.py --ckpt_path= --max_seq_len=1024   # a random model with a long context (5-shot fits)
"""
import time

import torch

from babyllama.configurator import run_main
from babyllama.inference import inference_precision, load_for_inference
from babyllama.mc import guess_benchmark, load_exam, load_subjects
from babyllama.scoring import score_mc
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/demo/pretrain/ckpt.pt"  # "" = a random model of the shape below, with tokenizer_model
tokenizer_model = "out/demo/tok8k.model"
dim, n_layers, n_heads, max_seq_len = 288, 6, 6, 1024  # the random model (bench.py's rival shape, long context)
mc_data = "../shared/data/ceval"
split = "val"
k_shot = 5
n_questions = 200  # the questions of the first subjects (sorted by name)
scoring = "letter,option"  # eval.py --mode=mc's default: both
batch_size = 8  # prompts (rows) per forward: a question is one by letter, four by option
num_threads = 2
dtype = "float32"  # the same arithmetic in every variant: predictions must agree
# -----------------------------------------------------------------------------------------------------------


def subset(exam, n):
    """The first whole subjects (sorted) holding about n questions, as an exam dict: a subject's questions
    share its few-shot prefix, as in a full C-Eval run."""
    out, total = {}, 0
    for s, p in exam.items():
        if total >= n:
            break
        out[s] = dict(p, questions=p["questions"][:n - total])
        total += len(out[s]["questions"])
    return out


def main():
    torch.set_num_threads(num_threads)
    if ckpt_path:
        model, tok, _, _, autocast_ctx = load_for_inference(ckpt_path, "cpu", dtype)
    else:
        _, autocast_ctx = inference_precision("cpu", dtype)
        tok = Tokenizer(tokenizer_model)
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=tok.vocab_size,
                                      max_seq_len=max_seq_len)).eval()
    exam = subset(load_exam(mc_data, split, "dev", k_shot), n_questions)
    names = load_subjects(guess_benchmark(mc_data), mc_data)
    n = sum(len(p["questions"]) for p in exam.values())
    scorings = scoring.split(",")
    print(f"{n} questions of {mc_data} ({len(exam)} subjects), {k_shot}-shot, by {' and '.join(scorings)}; model "
          f"{model.num_params() / 1e6:.1f}M parameters, context {model.args.max_seq_len}; {dtype}, "
          f"{num_threads} threads")
    # batch_size counts rows: with 1, each prompt (by option: each question-option pair) runs alone
    variants = [("one prompt at a time", 1, False), (f"batched ({batch_size} rows)", batch_size, False),
                (f"batched ({batch_size} rows) + prefix cache", batch_size, True)]
    runs = []
    for name, bs, cache in variants:
        score_mc(model, tok, subset(exam, 4), names, False, k_shot, scorings, bs, "cpu", autocast_ctx, cache)  # warm-up
        t0 = time.perf_counter()
        correct, preds, stats = score_mc(model, tok, exam, names, False, k_shot, scorings, bs, "cpu", autocast_ctx,
                                         cache)
        dt = time.perf_counter() - t0
        runs.append((name, dt, [p["prediction"] for p in preds], stats[scorings[0]]))
    base_dt, base_pred = runs[0][1], runs[0][2]
    print(f"shots kept: {runs[0][3]['fewer_shots']} prompts with fewer than {k_shot} shots, "
          f"{runs[0][3]['truncated']} cut on the left")
    print("| variant | seconds | questions/s | s per 1,000 questions | speed-up | same predictions |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, dt, pred, _ in runs:
        same = sum(a == b for a, b in zip(pred, base_pred))
        print(f"| {name} | {dt:.2f} | {n / dt:.1f} | {1000 * dt / n:.1f} | {base_dt / dt:.1f}x | "
              f"{same}/{len(pred)} |")


if __name__ == "__main__":
    run_main(globals(), main)
