"""
The end of `make demo`: what was trained, how long each stage took, the losses, a few continuations and chat
answers, the held-out scores before and after SFT and DPO, and where every file is. Printed, and written as
out/demo/summary.md. It only reads what the stages wrote (their summary.json, results and answer files).

    python demo_summary.py                   # after make demo
    python demo_summary.py --demo_dir=out/demo
"""
import json
import os

from clean_data.atomic import atomic_open
from configurator import run_main

# -----------------------------------------------------------------------------------------------------------
demo_dir = "out/demo"
n_answers = 3  # chat answers shown per model
# -----------------------------------------------------------------------------------------------------------


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


def stages_table(seconds):
    """Markdown table of the wall time of every stage that ran, and their total."""
    lines = ["| stage | wall time |", "|---|---:|"]
    for stage, s in seconds.items():
        lines.append(f"| {stage} | {s / 60:.1f} min ({s:.0f} s) |")
    total = sum(seconds.values())
    lines.append(f"| **all stages** | **{total / 60:.1f} min** |")
    return lines


def training_table(d):
    """Markdown table: one row per training stage, from its summary.json."""
    rows = [("pretraining", read_json(f"{d}/pretrain/summary.json"), "best_val_loss", "nats/token (sampled)"),
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


def scores_table(d):
    """Markdown table of the held-out chat scores of the base, SFT and DPO models (eval.py --mode=chat)."""
    models = [("base (before SFT)", f"{d}/pretrain/chat.json"), ("after SFT", f"{d}/sft/chat.json"),
              ("after DPO", f"{d}/dpo/chat.json")]
    lines = ["| model | well-formed poems | poems finished | author named | exact match (poem / author) |",
             "|---|---:|---:|---:|---:|"]
    for name, path in models:
        r = read_json(path)
        if r is None:
            continue
        poem, author = r["chat_scores"].get("poem", {}), r["chat_scores"].get("author", {})
        lines.append(f"| {name} | {pct(poem.get('well_formed'))} | {pct(poem.get('finished'))} | "
                     f"{pct(author.get('author_named'))} | {pct(poem.get('exact_match'))} / "
                     f"{pct(author.get('exact_match'))} |")
    n = (read_json(f"{d}/sft/chat.json") or {}).get("chat_scores", {}).get("poem", {}).get("n")
    if n:
        lines.append("")
        lines.append(f"{n} held-out poems (their titles never seen in SFT) and as many author questions, greedy "
                     f"decoding. Well-formed: 4 or 8 clauses, all of 5 or all of 7 characters, every line ending with 。？！ (chat_data.poetry.well_formed_poem).")
    return lines


def summarize(d):
    """The summary as a list of markdown lines."""
    pre = read_json(f"{d}/pretrain/summary.json") or {}
    ev = read_json(f"{d}/pretrain/eval.json") or {}
    dpo = read_json(f"{d}/dpo/summary.json") or {}
    out = ["# babyllama demo: summary", ""]
    if pre:
        out += [f"A {pre['params'] / 1e6:.2f}M-parameter Llama 2 pretrained on {pre['train_tokens']:,} tokens of the "
                f"chinese-poetry corpus, then chat-tuned (SFT) and preference-tuned (DPO).", ""]
    out += ["## Wall time per stage", ""] + stages_table(stage_seconds(f"{d}/stages.jsonl")) + [""]
    out += ["## Training", ""] + training_table(d) + [""]
    if "val_loss" in ev:
        out += [f"Pretrained model on every token of the validation file ({ev['val_tokens']:,} tokens, eval.py "
                f"--mode=loss): **val loss {ev['val_loss']:.4f}**, perplexity {ev['perplexity']:.1f}. (The training "
                f"log's val loss is an estimate on a few batches of random windows.)", ""]
    out += ["## Held-out scores", ""] + scores_table(d) + [""]
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
        picked = [r for r in rows if r.get("kind") == "poem"][:n_answers - 1] + \
                 [r for r in rows if r.get("kind") == "author"][:1]
        if picked:
            out += [f"## Chat answers after {name} (held-out questions, greedy)", ""]
            for r in picked:
                out += [f"- Q: {r['question']}", f"  A: {r['answer']}".replace("\n", " / ")]
            out += [""]
    files = [("corpus (downloaded)", "data/chinese-poetry"), ("tokenizer", f"{d}/tok8k.model"),
             ("cleaned corpus and report", f"{d}/clean/"), ("token files", f"{d}/data/"),
             ("pretrained model", f"{d}/pretrain/ckpt.pt"), ("its loss log and plot", f"{d}/pretrain/log.jsonl, loss.png"),
             ("SFT data", f"{d}/sft_data/"), ("SFT model", f"{d}/sft/ckpt.pt"), ("SFT answers", f"{d}/sft/answers.jsonl"),
             ("DPO pairs", f"{d}/dpo_data/"), ("DPO model", f"{d}/dpo/ckpt.pt"),
             ("DPO plots and samples", f"{d}/dpo/*.png, samples.json"), ("DPO answers", f"{d}/dpo/answers.jsonl"),
             ("this summary", f"{d}/summary.md")]
    out += ["## Files", "", "| what | where |", "|---|---|"] + [f"| {w} | `{p}` |" for w, p in files] + [""]
    out += ["Next: `python eval.py --mode=chat --ckpt_path=" + f"{d}/dpo/ckpt.pt` to chat with the final model.", ""]
    return out


def main():
    if not os.path.isdir(demo_dir):
        raise FileNotFoundError(f"{demo_dir} not found: run make demo first")
    text = "\n".join(summarize(demo_dir))
    path = os.path.join(demo_dir, "summary.md")
    with atomic_open(path) as f:
        f.write(text)
    print(text)
    print(f"summary -> {path}")


if __name__ == "__main__":
    run_main(globals(), main)
