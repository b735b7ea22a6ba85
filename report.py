"""The report card of a run, written as <run_dir>/report.md and printed (`make demo` ends with it): what was trained,
each stage's time, the loss and reward curves, eval.py's tables for the run's models, the held-out chat scores, samples,
and where every file is. It only reads what the stages wrote, so it can be re-run at any time.

    python report.py --run_dir=out/demo
"""
import glob
import json
import os

from babyllama import text_metrics
from babyllama.atomic import atomic_open
from babyllama.configurator import configure
from babyllama.mc import category_table

# -----------------------------------------------------------------------------------------------------------
run_dir = "out/demo"  # the run folder (pretrain/, sft/, dpo/, the eval results)
# -----------------------------------------------------------------------------------------------------------

STAGES = (("pretrain", "pretrained"), ("medical", "after medical pretraining"), ("sft", "after SFT"),
          ("dpo", "after DPO"))  # (make demo-zh continues pretraining on medical text in medical/)
PLOTS = (("pretrain/loss.png", "pretraining loss"), ("medical/loss.png", "medical pretraining loss"),
         ("sft/loss.png", "SFT loss"), ("dpo/loss.png", "DPO loss"),
         ("dpo/rewards.png", "DPO rewards"), ("dpo/accuracy.png", "DPO preference accuracy"))
N_ANSWERS = 3  # chat answers shown per model
N_REFERENCE = 5  # make demo-zh: doctor answers and translations shown per model


def read_json(path):
    """The JSON object in path, or None when the stage that writes it did not run."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    """The rows of a JSONL file ([] when it is missing)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_seconds(path):
    """{stage: seconds} from the stages.jsonl the Makefile appends to (the latest run of each stage)."""
    return {r["stage"]: r["seconds"] for r in read_jsonl(path)}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def num(v):
    return "-" if v is None else f"{v:.1f}"


def stages_table(seconds):
    """Markdown table of the wall time of every stage that ran, and their total."""
    lines = ["| stage | wall time |", "|---|---:|"]
    for stage, s in seconds.items():
        lines.append(f"| {stage} | {s / 60:.1f} min ({s:.0f} s) |")
    total = sum(seconds.values())
    lines.append(f"| **all stages** | **{total / 60:.1f} min** |")
    return lines


def val_curve(d, stage):
    """'iteration: held-out loss' pairs of a training stage's log (its sampled validation estimates), or ""."""
    rows = [r for r in read_jsonl(f"{d}/{stage}/log.jsonl") if r.get("val_loss") is not None and "iter" in r]
    return ", ".join(f"{r['iter']}: {r['val_loss']:.3f}" for r in rows)


def training_table(d):
    """Markdown table: one row per training stage, from its summary.json."""
    rows = [("pretraining", read_json(f"{d}/pretrain/summary.json"), "best_val_loss", "nats/token (sampled)"),
            ("medical pretraining", read_json(f"{d}/medical/summary.json"), "best_val_loss",
             "nats/token (sampled, medical text)"),
            ("SFT", read_json(f"{d}/sft/summary.json"), "best_val_loss", "nats/scored token"),
            ("DPO", read_json(f"{d}/dpo/summary.json"), None, "")]
    lines = ["| stage | iterations | tokens trained on | training time | tokens/s | final held-out loss |",
             "|---|---:|---:|---:|---:|---|"]
    for name, s, key, unit in rows:
        if s is None:
            continue
        loss = f"{s[key]:.4f} {unit}" if key and s.get(key) is not None else "-"
        lines.append(f"| {name} | {s['iter']:,} | {s['train_tokens']:,} | {s['train_seconds'] / 60:.1f} min "
                     f"(+{s.get('warmup_seconds', 0):.0f} s warm-up) | {s['tokens_per_sec']:,.0f} | {loss} |")
    return lines


REFERENCE_KINDS = {"qa": "Held-out doctor questions (the doctor's real answer as reference)",
                   "pairs": "Held-out classical -> modern translation (the human translation as reference)"}


def reference_scores(d, kind):
    """Markdown lines: BLEU-1..4, ROUGE-L and chrF of every model's greedy answers to the held-out questions of kind
    (eval.py --mode=chat's chat.json), under the baselines that need no model (sft_data_process.py's)."""
    found = [(label, read_json(f"{d}/{stage}/chat.json")) for stage, label in STAGES]
    found = [(label, r["chat_scores"][kind]) for label, r in found if r and kind in r.get("chat_scores", {})]
    if not found:
        return []
    rows = [(f"baseline: {name}", s) for name, s in found[0][1].get("baselines", {}).items()] + found
    out = [f"### {REFERENCE_KINDS[kind]}", "", text_metrics.scores_table(rows), ""]
    first = found[0][1].get("uncontaminated", {})
    clean = [(f"baseline: {name}", s) for name, s in first.get("baselines", {}).items()] + \
        [(label, s["uncontaminated"]) for label, s in found if "uncontaminated" in s]
    if clean:  # contamination.py flagged some of these questions: the same table without them
        out += [f"Without the {found[0][1]['n'] - clean[-1][1]['n']} questions whose reference a training document "
                f"nearly holds (contamination.py):", "", text_metrics.scores_table(clean), ""]
    return out


def scores_table(d):
    """Markdown table of the held-out chat scores of the base, SFT and DPO models (eval.py --mode=chat)."""
    models = [("base (before SFT)", f"{d}/pretrain/chat.json"), ("after SFT", f"{d}/sft/chat.json"),
              ("after DPO", f"{d}/dpo/chat.json")]
    if not any((read_json(path) or {}).get("chat_scores", {}).get("poem") for _, path in models):
        return []
    lines = ["| model | well-formed poems | poems finished | author named | exact match (poem / author) | "
             "poem BLEU-4 / ROUGE-L |", "|---|---:|---:|---:|---:|---:|"]
    for name, path in models:
        r = read_json(path)
        if r is None:
            continue
        poem, author = r["chat_scores"].get("poem", {}), r["chat_scores"].get("author", {})
        lines.append(f"| {name} | {pct(poem.get('well_formed'))} | {pct(poem.get('finished'))} | "
                     f"{pct(author.get('author_named'))} | {pct(poem.get('exact_match'))} / "
                     f"{pct(author.get('exact_match'))} | {num(poem.get('bleu4'))} / {num(poem.get('rougeL'))} |")
    n = (read_json(f"{d}/sft/chat.json") or {}).get("chat_scores", {}).get("poem", {}).get("n")
    if n:
        lines.append("")
        lines.append(f"{n} held-out poems (their titles never seen in SFT) and as many author questions, greedy "
                     f"decoding. Well-formed: 4 or 8 clauses, all of 5 or all of 7 characters, every line ending with 。？！ (babyllama.poem_form.well_formed_poem). "
                     f"BLEU-4 and ROUGE-L (%, characters) of the poem against the real one: a poem is not expected to match, "
                     f"they measure its closeness in wording.")
    return lines


def mc_section(results):
    """Markdown for one multiple-choice set scored on several models: results = [(model label, eval_mc JSON)].
    Few subjects (a benchmark of our own): accuracy per subject; C-Eval/CMMLU: Average and the categories."""
    first = results[0][1]
    scorings = list(first["scores"])
    subjects = sorted(first["scores"][scorings[0]]["subjects"])
    head = f"### {first['benchmark']} ({first['split']}, {first['k_shot']}-shot, {first['questions']:,} questions)"
    if len(subjects) <= 6:
        lines = [head, "", "| model | scoring | " + " | ".join(subjects) + " | average |",
                 "|---|---|" + "---:|" * (len(subjects) + 1)]
        for label, r in results:
            for sc in scorings:
                s = r["scores"][sc]
                lines.append(f"| {label} | {sc} | " + " | ".join(f"{100 * s['subjects'][x]:.1f}" for x in subjects)
                             + f" | {100 * s['average']:.1f} |")
        n = first["questions"]
        lines += ["", f"(accuracy in %; chance is 25%: with {n:,} questions, a score above "
                      f"{100 * (0.25 + 2 * (0.25 * 0.75 / n) ** 0.5):.1f}% is more than two standard errors above it)"]
    else:
        lines = [head, "", category_table([(f"{label}, by {sc}", r["scores"][sc]) for label, r in results
                                           for sc in scorings])]
    stats = [(label, r["prompt_stats"]) for label, r in results if r.get("prompt_stats")]
    if stats:
        lines += ["", "Prompts that did not fit the context: " + "; ".join(
            f"{label}: " + ", ".join(f"by {sc} {st['fewer_shots']} with fewer than {first['k_shot']} shots and "
                                     f"{st['truncated']} cut on the left" if first["k_shot"] else
                                     f"by {sc} {st['truncated']} cut on the left" for sc, st in ps.items())
            for label, ps in stats) + "."]
    flagged = [f"{label}: {r['contaminated']}" for label, r in results if r.get("contaminated") is not None]
    if flagged:
        lines += ["", f"Questions with a near-duplicate in the training data: {flagged[0].split(': ')[1]} of "
                      f"{first['questions']} (contamination.py)."]
    return lines + [""]


def eval_sections(d):
    """eval.py's tables beside the run's checkpoints (eval_*.json) and its contamination checks, as markdown lines."""
    found = {}  # kind/tag -> [(model label, result)]
    for stage, label in STAGES:
        for path in sorted(glob.glob(f"{d}/{stage}/eval_*.json")):
            tag = os.path.basename(path)[5:-5]
            found.setdefault(tag, []).append((label, read_json(path)))
    out = []
    ppl = [(f"{label}{' (medical text)' if tag == 'ppl_medical' else ''}", r) for tag in ("ppl", "ppl_medical")
           for label, r in found.pop(tag, [])]
    if ppl:
        out += ["### Perplexity and bits per character", "",
                "| model | data | tokens | loss (nats/token) | perplexity | bits/character |", "|---|---|---:|---:|---:|---:|"]
        out += [f"| {label} | {r['val_data']} | {r['val_tokens']:,} | {r['val_loss']:.4f} | {r['perplexity']:.2f} | "
                f"{r['bits_per_char']:.4f} |" for label, r in ppl] + [""]
    for tag in sorted(t for t in found if t.startswith("mc_")):
        out += mc_section(found[tag])
    gen = found.get("gen", [])
    if gen:
        out += ["### Generation against references (BLEU, ROUGE-L)", "",
                text_metrics.scores_table([(label, r["scores"]) for label, r in gen]), ""]
    for path in sorted(glob.glob(f"{d}/**/contamination.json", recursive=True)):
        r = read_json(path)
        out += [f"### Contamination of {r['eval_set']}", "", r["markdown"], ""]
    return out


def report_lines(d):
    """The report as a list of markdown lines."""
    pre = read_json(f"{d}/pretrain/summary.json") or {}
    ev = read_json(f"{d}/pretrain/eval.json") or {}
    dpo = read_json(f"{d}/dpo/summary.json") or {}
    out = [f"# babyllama report: {d}", ""]
    if pre:
        out += [f"A {pre['params'] / 1e6:.2f}M-parameter Llama 2 pretrained on {pre['train_tokens']:,} tokens, "
                f"then chat-tuned (SFT) and preference-tuned (DPO) where those stages ran.", ""]
    seconds = stage_seconds(f"{d}/stages.jsonl")
    if seconds:
        out += ["## Wall time per stage", ""] + stages_table(seconds) + [""]
    out += ["## Training", ""] + training_table(d) + [""]
    for stage, what in (("pretrain", "pretraining"), ("medical", "medical pretraining (medical text)")):
        curve = val_curve(d, stage)
        if curve:
            out += [f"Held-out loss through {what}, by iteration: {curve}.", ""]
    plots = [(f, what) for f, what in PLOTS if os.path.exists(os.path.join(d, f))]
    if plots:
        out += ["## Curves", ""] + [f"![{what}]({f})" for f, what in plots] + [""]
    if "val_loss" in ev:
        bpc = f", {ev['bits_per_char']:.4f} bits per character" if "bits_per_char" in ev else ""
        out += [f"Pretrained model on every token of the validation file ({ev['val_tokens']:,} tokens, eval.py "
                f"--mode=all): **val loss {ev['val_loss']:.4f}**, perplexity {ev['perplexity']:.1f}{bpc}. (The training "
                f"log's val loss is an estimate on a few batches of random windows.)", ""]
    evals = eval_sections(d)
    if evals:
        out += ["## Evaluations", ""] + evals
    held_out = scores_table(d) + [line for kind in REFERENCE_KINDS for line in reference_scores(d, kind)]
    if held_out:
        out += ["## Held-out scores", ""] + held_out + [""]
    held = dpo.get("held_out")
    if held:
        b, a = held["before"], held["after"]
        out += [f"DPO, {held['pairs']} held-out preference pairs: the model gives the preferred reply the higher "
                f"log-probability in **{pct(b['logps/accuracy'])} before -> {pct(a['logps/accuracy'])} after** "
                f"(mean margin {b['logps/margin']:.2f} -> {a['logps/margin']:.2f} nats).", ""]
    if ev.get("samples"):
        out += ["## Continuations (pretrained model, sampled)", ""]
        out += [f"- {s['prompt']}**{s['completion']}**".replace("\n", " / ") for s in ev["samples"]] + [""]
    for name, path in (("SFT", f"{d}/sft/answers.jsonl"), ("DPO", f"{d}/dpo/answers.jsonl")):
        rows = read_jsonl(path)
        picked = [r for r in rows if r.get("kind") == "poem"][:N_ANSWERS - 1] + \
                 [r for r in rows if r.get("kind") == "author"][:1]
        picked += [r for r in rows if r.get("kind") == "qa"][:N_REFERENCE] + \
                  [r for r in rows if r.get("kind") == "pairs"][:N_REFERENCE]
        if picked:
            out += [f"## Chat answers after {name} (held-out questions, greedy)", ""]
            for r in picked:
                out += [f"- Q: {r['question']}".replace("\n", " / "), f"  A: {r['answer']}".replace("\n", " / ")]
                if r.get("kind") in REFERENCE_KINDS:
                    out += [f"  reference: {r['reference']}".replace("\n", " / ")]
            out += [""]
    three = read_jsonl(f"{d}/dpo/three_questions.jsonl")
    if three:  # make demo-zh: the questions baby-llama2-chinese's README asks its models
        out += ["## The three questions of baby-llama2-chinese's README (final model, greedy)", ""]
        for r in three:
            out += [f"- Q: {r['question']}", f"  A: {r['answer']}".replace("\n", " / ")]
        out += [""]
    files = [("corpus (downloaded)", "data/chinese-poetry" if os.path.exists(f"{d}/poetry_bench") else "data/zh"),
             ("tokenizer", f"{d}/tok8k.model"),
             ("cleaned corpus and report", f"{d}/clean/"), ("token files", f"{d}/data/"),
             ("pretrained model", f"{d}/pretrain/ckpt.pt"), ("its loss log and plot", f"{d}/pretrain/log.jsonl, loss.png"),
             ("medical text: cleaned, tokens", f"{d}/clean_medical/, {d}/data_medical/"),
             ("medical-pretrained model", f"{d}/medical/ckpt.pt"), ("next-sentence cloze", f"{d}/cloze/"),
             ("held-out questions and their contamination", f"{d}/sft_data/eval_questions.jsonl, contamination.json"),
             ("SFT data", f"{d}/sft_data/"), ("SFT model", f"{d}/sft/ckpt.pt"), ("SFT answers", f"{d}/sft/answers.jsonl"),
             ("DPO pairs", f"{d}/dpo_data/"), ("DPO model", f"{d}/dpo/ckpt.pt"),
             ("DPO plots and samples", f"{d}/dpo/*.png, samples.json"), ("DPO answers", f"{d}/dpo/answers.jsonl"),
             ("this report", f"{d}/report.md")]
    files = [(w, p) for w, p in files if glob.glob(os.path.join(*p.split(", ")[:1]))]  # what this run wrote
    out += ["## Files", "", "| what | where |", "|---|---|"] + [f"| {w} | `{p}` |" for w, p in files] + [""]
    out += ["Next: `python eval.py --mode=chat --ckpt_path=" + f"{d}/dpo/ckpt.pt` to chat with the final model.", ""]
    return out


def main(run_dir):
    """Write <run_dir>/report.md and print it."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"{run_dir}: no such run folder (run make demo, or pass --run_dir)")
    text = "\n".join(report_lines(run_dir))
    path = os.path.join(run_dir, "report.md")
    with atomic_open(path) as f:
        f.write(text)
    print(text)
    print(f"report -> {path}")


if __name__ == "__main__":
    configure(globals())
    main(run_dir)
