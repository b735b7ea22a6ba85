"""A training run's checkpoints: where they live, how a run resumes (what it may not change; optimizer and RNG states
come back), and the Checkpointer policy (when to evaluate and save). File format: checkpoint_io.py."""
import contextlib
import math
import os
import shutil

import torch

from babyllama.checkpoint_io import copy, keep_tokenizer, load, save
from babyllama.optimize import configure_optimizers
from babyllama.rng import gather_rng_states, set_rng_state
from babyllama.sharded import load_extra, load_sharded, save_sharded

# what a resumed run may not change: the model's shape (pretraining); start weights, context, adapters (fine-tuning)
ARCHITECTURE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "norm_eps", "max_seq_len", "tie_embeddings", "rope_theta")
FINETUNE_KEYS = ("init_ckpt", "max_seq_len", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def checkpoint_path(out_dir, parallel):
    """Where a run keeps its latest state: out_dir/ckpt.pt, or out_dir/ckpt.dcp for parallel='fsdp'."""
    return os.path.join(out_dir, "ckpt.dcp" if parallel == "fsdp" else "ckpt.pt")


def load_resume(path, device="cpu"):
    """What resuming reads first: a .pt file's whole checkpoint dict; of a DCP folder only extra.pt, plus "dcp": the
    folder (load_sharded reads its shards once the model is sharded). FileNotFoundError naming the path."""
    return load_extra(path) if os.path.isdir(path) else load(path, device)


def training_state(model, optimizer, scaler, rngs, **fields):
    """The dict a training run saves: the adapters if the model has LoRA (model.lora_config; base_ckpt =
    fields["init_ckpt"]), else the full weights; the optimizer, loss scaler, every process's RNG state and the fields.
    optimizer None: a DCP checkpoint's extra.pt (weights and optimizer go to the shards)."""
    state = {"scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": rngs, **fields}
    if getattr(model, "lora_config", None):
        state.update(lora_config=dict(model.lora_config), base_ckpt=fields["init_ckpt"])
    if optimizer is None:
        return state
    state["optimizer"] = optimizer.state_dict()
    state["lora" if "lora_config" in state else "model"] = \
        {k: v for k, v in model.state_dict().items() if "lora_" in k} if "lora_config" in state else model.state_dict()
    return state


# ---- resuming ---------------------------------------------------------------------------------------------

def resume(init_from, start, ckpt_path, device, config, changed, keys, overwrite=False):
    """A script's resume step: (the checkpoint, the settings it fixes). init_from == start: a new run, (None, {});
    'resume': ckpt_path is loaded and returned with its values of keys (resume_config checks them against config and
    changed). SystemExit for any other init_from, and for a new run whose ckpt_path exists unless overwrite (forgetting
    --init_from=resume must not wipe a run; the Checkpointer then removes the old files)."""
    if init_from == start:
        if os.path.exists(ckpt_path) and not overwrite:
            raise SystemExit(f"{ckpt_path} exists (a run of {load_resume(ckpt_path)['iter_num']} iterations): "
                             f"continue it with --init_from=resume, or start over with --overwrite=True (or another "
                             f"out_dir)")
        return None, {}
    if init_from != "resume":
        raise SystemExit(f"init_from must be {start!r} or 'resume', not {init_from!r}")
    other = os.path.splitext(ckpt_path)[0] + (".pt" if ckpt_path.endswith(".dcp") else ".dcp")
    if not os.path.exists(ckpt_path) and os.path.exists(other):
        raise SystemExit(f"{ckpt_path} not found, but {other} is: that run used --parallel="
                         f"{'fsdp' if other.endswith('.dcp') else 'ddp'}; resume it with that setting (a sharded "
                         f"checkpoint resumes on any number of processes)")
    ckpt = load_resume(ckpt_path, device)
    return ckpt, resume_config(ckpt, config, changed, keys)


def init_architecture(args, changed, path):
    """The pretraining globals of a starting checkpoint's architecture (args: its ModelArgs), for continued pretraining.
    SystemExit when the command line or a config file sets one of them."""
    arch = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads or 0,
            "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
            "ffn_dim_multiplier": args.ffn_dim_multiplier or 0.0, "norm_eps": args.norm_eps,
            "max_seq_len": args.max_seq_len, "tie_embeddings": args.tie_embeddings, "rope_theta": args.rope_theta}
    if "max_seq_len" in changed:  # the context length is this run's choice: no weight depends on it
        del arch["max_seq_len"]
    asked = [k for k in ARCHITECTURE_KEYS if k in changed and k != "max_seq_len"]
    if asked:
        raise SystemExit(f"{path} decides the architecture of a run that starts from it; do not set "
                         f"{', '.join(asked)}")
    return arch


def resume_config(ckpt, config, changed, keys):
    """The values of keys a resumed run takes from its checkpoint; other settings (learning rate, batch size,
    max_iters...) stay this run's. config: this run's settings; changed: the keys the command line or a config file set
    (configurator.apply_overrides). SystemExit when changed asks for another value of a key the checkpoint decides."""
    saved = ckpt["config"]
    conflicts = [f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in keys
                 if k in changed and k in saved and config[k] != saved[k]]
    if conflicts:
        raise SystemExit("a resumed run keeps its checkpoint's " + ", ".join(k for k in keys if k in saved) +
                         "; cannot change " + "; ".join(conflicts) +
                         ". Start a new run (another out_dir) to change them.")
    return {k: saved[k] for k in keys if k in saved}


def training_optimizer(model, ckpt, run, seed, weight_decay, learning_rate, betas, optimizer="adamw"):
    """The optimizer of the model's trainable parameters (optimize.configure_optimizers: 'adamw' or 'muon'), RNG set.
    Under FSDP the model must be sharded already (dist.parallelize). Resuming (ckpt: a checkpoint dict, or load_resume's
    of a DCP folder): the optimizer state, the loss scaler (run.scaler) and this process's RNG state come back; from
    another number of processes the RNG is reseeded deterministically. Starting (ckpt None): each process is seeded
    differently (dropout masks must differ). SystemExit when the checkpoint holds another optimizer's state."""
    name = optimizer
    optimizer = configure_optimizers(model, weight_decay, learning_rate, betas, run.device_type, name)
    if ckpt is None:
        torch.manual_seed(seed + run.rank)
        return optimizer
    try:
        if "dcp" in ckpt:
            load_sharded(ckpt["dcp"], model, optimizer)
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise SystemExit(f"cannot resume with optimizer={name!r}: the checkpoint's optimizer state does not fit "
                         f"({e}); resume with the optimizer the run started with") from e
    iter_num = ckpt["iter_num"]
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    if len(states) == run.world_size:
        set_rng_state(states[run.rank])
    else:
        torch.manual_seed(seed + run.rank + iter_num)
        if run.master:
            print(f"note: checkpoint had {len(states)} process(es), now {run.world_size}: RNG reseeded")
    return optimizer


class Checkpointer:
    """A training run's checkpoints, the same in every script: when they are written and what they hold (training_state
    plus the fields given here: model_args, config, init_ckpt, tokenizer...). Two files: `path` (out_dir/ckpt.pt), the
    latest state, which init_from=resume continues, and best.pt beside it, the best validation loss so far (to evaluate,
    export or fine-tune).
    - Evaluate every eval_interval iterations and at the last one (exceptions: eval_due).
    - After an evaluation, first the divergence check: a non-finite loss, or one at or above `ceiling` after being below
      it, raises FloatingPointError before anything is written, so a diverged model never replaces a good one (no ratio
      to the best loss: a preference loss near 0 or a small fine-tuning loss can triple from noise). Then best.pt is
      written if the loss improved, and ckpt.pt too, or at every evaluation with always_save_checkpoint.
    - Without validation data (val_loss None) ckpt.pt is written every eval_interval iterations (a killed run resumes).
    - At the end ckpt.pt is written unless it holds the last iteration already.
    Nothing is written at the iteration the run started from (a run that never improves on its start has no best.pt).
    Every process makes the same calls (saving gathers RNG states); the master logs {"iter", "checkpoint"}."""

    def __init__(self, path, ckpt, run, model, optimizer, log, eval_interval, always_save_checkpoint,
                 ceiling=None, **fields):
        """ckpt: the checkpoint a resumed run continues, None for a new run. model: the plain Transformer (not a DDP or
        compile wrapper). ceiling: the loss of a model that learned nothing (ln vocab_size for next-token losses), None
        when there is none (preference losses)."""
        self.path, self.run, self.model, self.optimizer, self.log, self.fields = path, run, model, optimizer, log, fields
        self.sharded = path.endswith(".dcp")  # parallel='fsdp': DCP folders behind ckpt.dcp and best.dcp
        self.best_path = os.path.join(os.path.dirname(os.path.abspath(path)), "best.dcp" if self.sharded else "best.pt")
        self.resumed = ckpt is not None
        self.start_iter = ckpt["iter_num"] if self.resumed else 0
        self.best_val_loss = ckpt["best_val_loss"] if self.resumed else float("inf")
        self.eval_interval, self.always, self.ceiling = eval_interval, always_save_checkpoint, ceiling
        self.saved_at = self.start_iter if self.resumed else None
        self.evaluated_at = None  # the iteration of this run's latest evaluation
        self.tokenizer_kept = not run.master or not fields.get("tokenizer")  # copied beside at the first save
        self.best_train_loss = float("inf")
        if not self.resumed and run.master:  # a new run (told to --overwrite): the old run's files are not its own
            for old in (path, self.best_path, os.path.join(os.path.dirname(self.best_path), "summary.json")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
            shutil.rmtree(os.path.join(os.path.dirname(self.best_path), "dcp"), ignore_errors=True)

    def eval_due(self, iter_num, last):
        """True when iteration iter_num (the last one when last) should evaluate: not at a resumed run's first iteration
        (the run it continues evaluated there), nor at a last iteration right after an evaluation (a max_minutes stop
        during one): one step changes little, and at_end still saves."""
        if self.resumed and iter_num == self.start_iter:
            return False
        if iter_num % self.eval_interval == 0:
            return True
        return last and (self.evaluated_at is None or iter_num - self.evaluated_at > 1)

    def after_eval(self, iter_num, val_loss):
        """Record an evaluation's loss (nats per token, or the script's held-out loss; None without validation
        data) and write what is due. Raises FloatingPointError when the run diverged (see the class)."""
        self.evaluated_at = iter_num
        if val_loss is None:
            self.save(iter_num)
            return
        why = self._diverged(val_loss)
        if why:
            self.stop(f"validation loss {val_loss:.4g} at iteration {iter_num} {why}")
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if improved or self.always:
            self.save(iter_num, best=improved)

    def check_train_loss(self, iter_num, loss):
        """Stop (FloatingPointError) before the update on a non-finite training loss, or one back at the ceiling after
        being below 90% of it: a model that learned something and lost it all has diverged; a hard batch does not."""
        if not math.isfinite(loss):
            self.stop(f"training loss {loss} at iteration {iter_num}")
        if self.ceiling is not None and self.best_train_loss < 0.9 * self.ceiling and loss >= self.ceiling:
            self.stop(f"training loss {loss:.4g} at iteration {iter_num} is back at {self.ceiling:.3f}, the loss of "
                      f"a uniform guess, after {self.best_train_loss:.4g}")
        self.best_train_loss = min(self.best_train_loss, loss)

    def at_end(self, iter_num):
        """Write the final state unless it is written already (so init_from=resume can continue it)."""
        if self.saved_at != iter_num:
            self.save(iter_num)

    def _diverged(self, val_loss):
        if not math.isfinite(val_loss):
            return "is not a number"
        if self.ceiling is not None and self.best_val_loss < self.ceiling <= val_loss:
            return f"reached {self.ceiling:.3f}, the loss of a uniform guess, after {self.best_val_loss:.4g}"
        return ""

    def stop(self, what):
        """Raise FloatingPointError saying what diverged and what the files on disk hold."""
        if self.saved_at is None:
            held = "This run wrote no checkpoint."
        else:
            held = f"{self.path} (iteration {self.saved_at})"
            if os.path.exists(self.best_path) and math.isfinite(self.best_val_loss):
                held += f" and {self.best_path} (validation loss {self.best_val_loss:.4g})"
            held += " are untouched."
        raise FloatingPointError(f"{what}: the run diverged; stopping without saving. {held} Lower learning_rate, "
                                 f"check the data, or use bfloat16 instead of float16.")

    def save(self, iter_num, best=False):
        """Write ckpt.pt (.dcp) atomically, and best.pt (.dcp) when best; nothing at the run's starting iteration. The
        first save of this process also copies the tokenizer beside them (checkpoint_io.keep_tokenizer)."""
        if iter_num <= self.start_iter:
            return
        rngs = gather_rng_states(self.run)  # a collective: every process takes part
        if not self.tokenizer_kept:  # before the weights: a checkpoint on disk has its tokenizer beside it
            self.tokenizer_kept = True
            if not keep_tokenizer(self.path, self.fields["tokenizer"], self.fields.get("tokenizer_sha256", "")):
                print(f"note: tokenizer {self.fields['tokenizer']} not found (or not the recorded one): not copied "
                      f"beside {self.path}; loading it elsewhere needs --tokenizer_model=")
        fields = dict(iter_num=iter_num, best_val_loss=self.best_val_loss, **self.fields)
        if self.sharded:  # every process writes its shards; the weights and optimizer state go there
            extra = training_state(self.model, None, self.run.scaler, rngs, **fields)
            save_sharded(self.path, self.model, self.optimizer, extra, self.run, self.best_path if best else None)
        elif self.run.master:
            save(self.path, training_state(self.model, self.optimizer, self.run.scaler, rngs, **fields))
            if best:
                copy(self.path, self.best_path)
        self.log.write(iter=iter_num, checkpoint=self.path, **({"best": True} if best else {}))  # (master only)
        self.saved_at = iter_num

