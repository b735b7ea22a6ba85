"""Answering many prompts: chat prompts fitted to the context, replies generated in padded batches, and the
replies scored against reference answers (eval.py --mode=chat with a questions file, --mode=gen)."""
import time

from babyllama import text_metrics
from babyllama.generate import generate, right_pad
from babyllama.poem_form import well_formed_poem
from babyllama.scoring import progress
from tokenizer.chat_template import encode_prompt, stop_ids


def fit_history(tok, history, max_prompt_tokens, system=None):
    """The chat prompt, oldest exchanges dropped until it fits max_prompt_tokens: (prompt ids, the history kept)."""
    while True:
        prompt = encode_prompt(tok, history, system or None)
        if len(prompt) <= max_prompt_tokens or len(history) <= 1:
            return prompt[-max_prompt_tokens:], history
        history = history[2:]


def generate_replies(model, tok, prompts, max_new_tokens, sampling, batch_size, device, autocast_ctx, desc):
    """Generate for each prompt (list of ids) in padded batches, progress bar desc; sampling: generate()'s temperature,
    top_k, top_p, repetition_penalty. Returns ([(reply ids, finished: ended on a stop token)], new tokens, seconds)."""
    stops = set(stop_ids(tok))
    out, n_new, t0 = [], 0, time.time()
    bar = progress(desc, len(prompts), "answer")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        idx, lens = right_pad(chunk)
        with autocast_ctx:
            outs = generate(model, idx.to(device), max_new_tokens, prompt_lens=lens, **sampling,
                            stop_ids=stop_ids(tok))
        for o in outs:
            n_new += len(o)
            out.append((o, bool(o) and o[-1] in stops))
        bar.update(len(chunk))
    bar.close()
    return out, n_new, time.time() - t0


def answer_scores(items):
    """Scores per kind of the items with a "reference" ({"answer", "finished", "reference", optional "kind", "author",
    "baselines": {name: answer}}): {kind or "all": {"n", "exact_match", "finished", ["well_formed": poems],
    ["author_named": authors], "bleu1".."bleu4", "rougeL", "chrf", ["baselines": {name: the same metrics of the
    baseline answers}], ["uncontaminated": all of these again without the items marked "contaminated"]}}; rates in
    [0, 1], BLEU, ROUGE and chrF in % (babyllama/text_metrics.py)."""
    scores = {}
    for kind in sorted({it.get("kind", "") for it in items if "reference" in it}):
        group = [it for it in items if "reference" in it and it.get("kind", "") == kind]
        s = {"n": len(group), "exact_match": sum(it["answer"] == it["reference"] for it in group) / len(group),
             "finished": sum(it["finished"] for it in group) / len(group)}
        if kind == "poem":
            s["well_formed"] = sum(it["finished"] and well_formed_poem(it["answer"]) for it in group) / len(group)
        if kind == "author":  # the right name anywhere in the reply
            s["author_named"] = sum(bool(it.get("author")) and it["author"] in it["answer"] for it in group) / len(group)
        refs = [it["reference"] for it in group]
        m = text_metrics.corpus_scores([it["answer"] for it in group], refs)
        s.update({k: m[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "chrf")})
        names = sorted({b for it in group for b in it.get("baselines") or {}})
        for b in names:  # answers that need no model, scored on the questions that have one (sft_data_process.py's)
            have = [it for it in group if b in (it.get("baselines") or {})]
            s.setdefault("baselines", {})[b] = text_metrics.corpus_scores([it["baselines"][b] for it in have],
                                                                          [it["reference"] for it in have])
        clean = [it for it in group if not it.get("contaminated")]
        if clean and len(clean) < len(group):  # again without the questions a training document nearly holds
            s["uncontaminated"] = answer_scores(clean)[kind or "all"]
        scores[kind or "all"] = s
    return scores
