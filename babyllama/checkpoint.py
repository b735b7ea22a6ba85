"""A training run's checkpoints: where a run keeps them, how it resumes (what a resumed run takes from its
checkpoint and may not change, the optimizer and every process's RNG state back), and the Checkpointer policy
(when a loop evaluates and saves, what it refuses to overwrite). The file format is babyllama/checkpoint_io.py's.
"""
import contextlib
import math
import os
import shutil

import torch

from babyllama.checkpoint_io import copy, load, save
from babyllama.optimize import configure_optimizers
from babyllama.rng import gather_rng_states, set_rng_state
from babyllama.sharded import load_extra, load_sharded, save_sharded

# what a resumed run takes from its checkpoint and may not change: the model's shape (pretraining) and, for
# fine-tuning, the starting weights, the context length and the adapters' shape
ARCHITECTURE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "norm_eps", "max_seq_len", "tie_embeddings", "rope_theta")
FINETUNE_KEYS = ("init_ckpt", "max_seq_len", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def checkpoint_path(out_dir, parallel):
    """Where a run keeps its latest state: out_dir/ckpt.pt, or out_dir/ckpt.dcp for parallel='fsdp'."""
    return os.path.join(out_dir, "ckpt.dcp" if parallel == "fsdp" else "ckpt.pt")


def load_resume(path, device="cpu"):
    """What resuming reads first: the whole checkpoint dict of a .pt file; of a DCP folder only extra.pt (the
    fields, iter_num, RNG states...) with "dcp": the folder, whose shards load_sharded reads once the model is
    sharded. FileNotFoundError naming the path."""
    return load_extra(path) if os.path.isdir(path) else load(path, device)


def training_state(model, optimizer, scaler, rngs, **fields):
    """The dict a training run saves: the adapters only when the model carries LoRA (apply_lora sets
    model.lora_config; base_ckpt = fields["init_ckpt"]), else the full weights; plus the optimizer, the loss
    scaler, every process's RNG state and the given fields (model_args, iter_num, best_val_loss, config, ...).
    optimizer None: a sharded checkpoint's extra.pt (weights and optimizer state go to the DCP shards)."""
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
    """A script's resume step: (the checkpoint, the settings it fixes). init_from must be `start` (a new run:
    returns (None, {})) or 'resume': then the checkpoint at ckpt_path is loaded and returned with its values of
    the settings named in keys (resume_config checks them against config, the script's settings, and changed,
    those the command line set); the script applies them to its globals. Raises SystemExit for any other
    init_from, and for a new run whose ckpt_path exists already unless overwrite (forgetting
    --init_from=resume must not wipe a run; with overwrite the Checkpointer removes the old run's checkpoints
    before this run writes anything)."""
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
    """The pretraining globals of a starting checkpoint's architecture (args: its ModelArgs), for a run that
    continues pretraining it. Raises SystemExit when the command line or a config file asked for another value
    of one of them."""
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
    """The settings named in keys as a resumed run's checkpoint has them (the run continues with the model,
    adapters and context it has); the other settings stay this run's (learning rate, batch size, max_iters...
    may change). config: this run's settings; changed: the keys the command line or a config file set (what
    configurator.apply_overrides returns). Raises SystemExit when one of them asks for another value of a key
    the checkpoint decides, rather than ignoring the request silently."""
    saved = ckpt["config"]
    conflicts = [f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in keys
                 if k in changed and k in saved and config[k] != saved[k]]
    if conflicts:
        raise SystemExit("a resumed run keeps its checkpoint's " + ", ".join(k for k in keys if k in saved) +
                         "; cannot change " + "; ".join(conflicts) +
                         ". Start a new run (another out_dir) to change them.")
    return {k: saved[k] for k in keys if k in saved}


def training_optimizer(model, ckpt, run, seed, weight_decay, learning_rate, betas, optimizer="adamw"):
    """The optimizer of the model's trainable parameters (babyllama.optimize.configure_optimizers: 'adamw' or 'muon'), and
    the RNG. Under FSDP the model must be sharded already (babyllama.dist.parallelize). Resuming (ckpt a checkpoint
    dict, or load_resume's fields of a DCP folder, whose weights and optimizer state load here): the optimizer,
    the loss scaler (run.scaler) and this process's RNG state come back. Starting (ckpt None): each process is
    seeded differently (dropout masks must differ across processes). A checkpoint from another number of
    processes cannot give each its own state, so the RNG is then reseeded deterministically. Returns the
    optimizer. SystemExit when the checkpoint's optimizer state is another optimizer's."""
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
    """A training run's checkpoints, the same way in every script: where they are written, what goes in them
    (training_state: the model or its adapters, the optimizer, the loss scaler, every process's RNG state, and
    the fields given at construction, such as model_args, config, init_ckpt, tokenizer), and when.

    Two files, kept apart: `path` (out_dir/ckpt.pt), the latest state, which init_from=resume continues; and
    best.pt beside it, the state of the best validation loss so far (what to evaluate, export or fine-tune).

    - Evaluate every eval_interval iterations and at the last one, but not again at the iteration a resumed run
      starts from (the run it continues evaluated there), nor at a last iteration that comes right after an
      evaluation (see eval_due).
    - After an evaluation, first the divergence check: a NaN or infinite loss, or a loss at or above `ceiling`
      (ln V for a language model's loss: it predicts no better than a uniform guess) after having been below
      it, stops the run (FloatingPointError naming the iteration and what each file holds) before anything is
      written, so a diverged model never replaces a good one. (No ratio to the best loss: a preference loss
      near 0, or a small fine-tuning loss, can triple from noise or overfitting without diverging.) Then
      best.pt is written when the loss improved, and ckpt.pt at every evaluation (always_save_checkpoint) or
      when it improved. The evaluation at the iteration a run starts from is never saved, so a run that never
      improves on its start has no best.pt.
    - Without validation data (val_loss None) ckpt.pt is written every eval_interval iterations, so a killed
      run can still resume.
    - check_train_loss stops on a NaN or infinite training loss, or one back at the ceiling, before the update
      that would spread it.
    - At the end ckpt.pt is written unless it already holds the last iteration.
    Never at the iteration the run started from (nothing new). Every process makes the same calls (saving
    gathers each process's RNG state); the master writes. Each write is noted in the log as
    {"iter", "checkpoint": path}."""

    def __init__(self, path, ckpt, run, model, optimizer, log, eval_interval, always_save_checkpoint,
                 ceiling=None, **fields):
        """ckpt: the checkpoint a resumed run continues (its iteration and best validation loss), None for a new
        run. model: the plain Transformer (not a DDP or compile wrapper). ceiling: the loss of a model that has
        learned nothing (ln vocab_size for next-token losses), None when there is none (preference losses)."""
        self.path, self.run, self.model, self.optimizer, self.log, self.fields = path, run, model, optimizer, log, fields
        self.sharded = path.endswith(".dcp")  # parallel='fsdp': DCP folders behind ckpt.dcp and best.dcp
        self.best_path = os.path.join(os.path.dirname(os.path.abspath(path)), "best.dcp" if self.sharded else "best.pt")
        self.resumed = ckpt is not None
        self.start_iter = ckpt["iter_num"] if self.resumed else 0
        self.best_val_loss = ckpt["best_val_loss"] if self.resumed else float("inf")
        self.eval_interval, self.always, self.ceiling = eval_interval, always_save_checkpoint, ceiling
        self.saved_at = self.start_iter if self.resumed else None
        self.evaluated_at = None  # the iteration of this run's latest evaluation
        self.best_train_loss = float("inf")
        if not self.resumed and run.master:  # a new run (told to --overwrite): the old run's files are not its own
            for old in (path, self.best_path, os.path.join(os.path.dirname(self.best_path), "summary.json")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
            shutil.rmtree(os.path.join(os.path.dirname(self.best_path), "dcp"), ignore_errors=True)

    def eval_due(self, iter_num, last):
        """True when iteration iter_num (the last one when last) should evaluate. The last iteration does not
        evaluate when the one before it did (a run whose max_minutes ran out during an evaluation stops one
        step later): one step changes little, and at_end still saves its state."""
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
        """Stop (FloatingPointError) before the update on a NaN or infinite training loss, or one back at the
        ceiling (a uniform guess) after the run had got below 90% of it: a language model that knew something
        and lost it all has diverged; a batch of hard examples does not do that."""
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
        """Write ckpt.pt (or the sharded ckpt.dcp) for iteration iter_num atomically, and best.pt (best.dcp) too
        when best; nothing at the iteration the run started from."""
        if iter_num <= self.start_iter:
            return
        rngs = gather_rng_states(self.run)  # a collective: every process takes part
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

