"""An RL run around its loop (grpo.py, ppo.py): its start (policy, optimizer, frozen reference, tokenizer), the requests
it samples, log and checkpoints, each iteration's rollout, held-out evaluation and summary. The loops, and all that
differs between the algorithms, stay in the scripts."""
import os

import torch

from babyllama import checkpoint as ck, dist, models, runlog
from babyllama.atomic import write_json
from babyllama.inference import checkpoint_tokenizer
from babyllama.poetry_rewards import exact_form_share, requests_from
from babyllama.rl import rollout
from tokenizer.chat_template import decode_reply, encode_prompt, stop_ids


def setup(out_dir, init_from, overwrite, config, changed, device, dtype, num_threads, compile):
    """An RL run's start: the processes (one micro-step each: setup_run counts those of all of them together),
    its checkpoint path (ckpt.pt: no FSDP for RL) and what resuming reads (ck.resume; the script applies
    `fixed`, the settings the checkpoint decides). Returns (run, ckpt_path, resume_ckpt, iter_num, fixed)."""
    run = dist.setup_run(device, dtype, num_threads, int(os.environ.get("WORLD_SIZE", "1")), out_dir, compile, False)
    ckpt_path = ck.checkpoint_path(out_dir, "ddp")
    resume_ckpt, fixed = ck.resume(init_from, "sft", ckpt_path, run.device, config, changed, ck.FINETUNE_KEYS,
                                   overwrite)
    return run, ckpt_path, resume_ckpt, resume_ckpt["iter_num"] if resume_ckpt else 0, fixed


class Requests:
    """The prompts of an RL run: poem requests (poetry_rewards.requests_from) from a file, their chat-template ids (cut
    from the left so max_new_tokens fit the context), and each iteration's prompts and sampling RNG, functions of (seed,
    iteration, rank) only, so a resumed run samples what a straight one would. SystemExit naming the file when it holds
    no request, or when no room is left for a prompt."""

    def __init__(self, tok, path, max_seq_len, max_new_tokens, seed, rank, limit=0):
        self.items, skipped = requests_from(path, limit)
        if skipped and rank == 0:
            print(f"{path}: {skipped} line(s) skipped, not JSON objects")
        if not self.items:
            raise SystemExit(f"{path}: no poem requests (want SFT conversations or the demo's held-out questions)")
        self.room = max_seq_len - max_new_tokens
        if self.room < 8:
            raise SystemExit(f"max_new_tokens {max_new_tokens} leaves {self.room} tokens of the {max_seq_len}-token "
                             f"context for the prompt")
        self.encode = lambda r: encode_prompt(tok, [{"role": "user", "content": r}])[-self.room:]
        self.seed, self.rank = seed, rank

    def ids(self, request):
        return self.encode(request)

    def of_iteration(self, it, n):
        """The n requests of iteration it on this process."""
        g = torch.Generator().manual_seed(self.seed + it * 7919 + self.rank * 104729)
        return [self.items[int(i)] for i in torch.randint(len(self.items), (n,), generator=g)]

    def sampler(self, it, device):
        """The sampling RNG of iteration it on this process."""
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + it * 1_009 + self.rank)


def policy_and_reference(init_ckpt, resume_ckpt, run, seed, weight_decay, learning_rate, betas,
                         tokenizer_model=""):
    """An RL script's start: the policy (init_ckpt's weights, or the resumed run's), its AdamW and DDP wrapper, the
    frozen reference (the starting weights) and the tokenizer (inference.checkpoint_tokenizer). Returns (raw_model,
    model_args, optim, model, reference, tokenizer)."""
    raw_model, model_args, start_state, init = models.finetune_model(init_ckpt, resume_ckpt, run.device, seed)
    optim = ck.training_optimizer(raw_model, resume_ckpt, run, seed, weight_decay, learning_rate, betas)
    model = dist.wrap_ddp(raw_model, run)
    ref = models.frozen_copy(model_args, start_state, run.device)
    tok = checkpoint_tokenizer(init, init_ckpt, model_args["vocab_size"], tokenizer_model)
    return raw_model, model_args, optim, model, ref, tok


def log_and_checkpointer(config, ckpt_path, resume_ckpt, run, raw_model, optim, model_args, tok):
    """The run's JSONL log (out_dir/log.jsonl, continued on resume) and Checkpointer, from config (its settings)."""
    log = runlog.JsonlLog(os.path.join(config["out_dir"], "log.jsonl"), resume_ckpt["iter_num"] if resume_ckpt
                          else None, enabled=run.master)
    checkpointer = ck.Checkpointer(ckpt_path, resume_ckpt, run, raw_model, optim, log, config["eval_interval"],
                                   config["always_save_checkpoint"], model_args=model_args, config=config,
                                   init_ckpt=config["init_ckpt"], tokenizer=tok.model_path,
                                   tokenizer_sha256=tok.sha256(),
                                   data={"sampler": "stateless", "seed": config["seed"],
                                         "train": config["train_prompts"]})
    return log, checkpointer


def sample(raw_model, tok, requests, it, n_prompts, group_size, max_new_tokens, temperature, top_p, run):
    """Iteration it's rollout on this process: n_prompts requests and group_size replies to each, one batch with the
    iteration's RNG under run.autocast. Returns four lists, an entry per reply, groups consecutive: request, prompt ids,
    reply ids (an empty reply becomes the end token alone: it still scores its stop), reply text."""
    asked = requests.of_iteration(it, n_prompts)
    prompts = [requests.ids(r) for r in asked]
    with run.autocast:
        replies = rollout(raw_model, prompts, group_size, max_new_tokens, stop_ids(tok), run.device, temperature,
                          top_p, requests.sampler(it, run.device))
    replies = [r if r else [tok.end_id] for r in replies]
    return ([q for q in asked for _ in range(group_size)], [p for p in prompts for _ in range(group_size)], replies,
            [decode_reply(tok, r) for r in replies])


def evaluate(checkpointer, net, tok, val, rewards_of, max_new_tokens, run, log, it):
    """An evaluation at iteration it: held_out's scores on val (None: none), then checkpointer.after_eval with minus the
    mean held-out reward over all processes (it keeps the lowest). Returns this process's scores, or None."""
    ev = held_out(net, tok, val, rewards_of, max_new_tokens, run, log, it) if val is not None else None
    checkpointer.after_eval(it, -dist.all_reduce_mean(ev["reward"], run) if ev is not None else None)
    return ev


@torch.no_grad()
def held_out(net, tok, val, rewards_of, max_new_tokens, run, log, it):
    """Greedy replies of net to the held-out requests val.items, scored (rewards_of) and logged with the first reply:
    {"reward": mean reward, "exact_form": share in the exact requested form, "length": mean reply tokens}."""
    was_training = net.training
    net.eval()
    with run.autocast:
        out = rollout(net, [val.ids(r) for r in val.items], 1, max_new_tokens, stop_ids(tok), run.device,
                      temperature=0.0)
        texts = [decode_reply(tok, o) for o in out]
        r = rewards_of(val.items, texts)
    net.train(was_training)
    ev = {"reward": sum(r) / len(r), "exact_form": exact_form_share(val.items, texts),
          "length": sum(len(o) for o in out) / len(out)}
    log.write(f"iter {it}: held-out reward {ev['reward']:.3f}, exact form {ev['exact_form']:.3f}, "
              f"length {ev['length']:.1f}; e.g. {val.items[0]} -> {texts[0][:40]!r}",
              iter=it, **{f"val/{k}": v for k, v in ev.items()})
    return ev


def tokens_per_sec(tokens, seconds):
    """{"<part>_tokens_per_sec": ...} of each part of the loop ("rollout", "train")."""
    return {f"{k}_tokens_per_sec": round(tokens[k] / max(seconds[k], 1e-9), 1) for k in tokens}


def write_summary(out_dir, log, summary, evals, val, algorithm, kl_label):
    """The end of an RL run (master only): summary gets the held-out scores before and after (evals: iteration ->
    scores; only when the run scored its start), is printed, logged and written to out_dir/summary.json (last: the run
    finished), beside the reward and KL PNGs."""
    if evals.get(0):
        before, after = evals[0], evals[max(evals)]
        summary["held_out"] = {"requests": len(val.items), "before": before, "after": after}
        print(f"held-out requests ({len(val.items)}): exact form {before['exact_form']:.3f} -> "
              f"{after['exact_form']:.3f}, reward {before['reward']:.3f} -> {after['reward']:.3f}")
    log.write(summary=summary)
    runlog.plot_log(log.path, os.path.join(out_dir, "reward.png"), (("reward", "train (sampled)"),
                    ("val/reward", "held-out (greedy)")), title=f"{algorithm} reward ({summary['reward']})")
    runlog.plot_log(log.path, os.path.join(out_dir, "kl.png"), (("kl", kl_label),), title=f"{algorithm} KL")
    print(f"summary: {summary}")
    log.close()
    write_json(os.path.join(out_dir, "summary.json"), summary)
