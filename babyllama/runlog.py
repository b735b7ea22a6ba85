"""A run's record: step timing, the progress bar, the JSONL log, loss plots and the throughput summary."""
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from babyllama.atomic import atomic_path, write_jsonl
from babyllama.dist import all_reduce_sum


class StepTimer:
    """Wall time of the training iterations alone, and the tokens they trained on. lap(n_tokens) ends an iteration and
    returns its seconds; skip() after an evaluation or checkpoint write counts that time toward no iteration. The first
    lap is the warm-up (allocation, torch.compile: tens of seconds), kept apart in warmup_seconds, so seconds and tokens
    give tokens per second the same way in every script."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.start = self.t0 = clock()
        self.seconds, self.tokens, self.laps, self.warmup_seconds = 0.0, 0, 0, 0.0

    def lap(self, n_tokens):
        """End an iteration that trained on n_tokens; returns its seconds."""
        t = self.clock()
        dt, self.t0 = t - self.t0, t
        self.laps += 1
        if self.laps == 1:
            self.warmup_seconds = dt
        else:
            self.seconds += dt
            self.tokens += n_tokens
        return dt

    def skip(self):
        """Leave the time since the last lap out of every iteration (evaluation, saving)."""
        self.t0 = self.clock()

    def out_of_time(self, max_minutes, run=None):
        """True once the wall time since the start, everything included, has reached max_minutes (0 = never). With a DDP
        run, True on every process as soon as on one: processes that disagree on the last iteration would hang."""
        if not max_minutes:
            return False
        late = (self.clock() - self.start) / 60 >= max_minutes
        return all_reduce_sum(float(late), run) > 0 if run is not None else late


class Progress:
    """What a person sees of a training loop (master only; the JSONL log keeps every number): a first line saying what
    the stage will do, a tqdm bar (ETA, loss, tokens/s), and after `measure` iterations the expected training time: the
    median of the second half of them (the first few are slow: 3 iterations of ~5 s before 0.18 s in one CPU run)."""

    def __init__(self, stage, start, total, what, enabled=True, measure=24):
        """stage: its name ('pretrain'); start, total: the first and the end iteration; what: the plan (e.g.
        '1,000 iterations x 4,096 tokens')."""
        self.enabled, self.left, self.measure, self.stage = enabled, total - start, measure, stage
        self.bar, self.dts = None, []
        if not enabled:
            return
        print(f"{stage}: {what}", flush=True)
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="it", dynamic_ncols=True, smoothing=0.05,
                        mininterval=0.5 if _stderr_is_tty() else 30)

    def step(self, loss, n_tokens, dt):
        """Per iteration (dt seconds, n_tokens): advance the bar; after `measure` of them, print the time left."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {n_tokens / max(dt, 1e-9):,.0f} tok/s", refresh=False)
        if len(self.dts) >= min(self.measure, self.left):
            return
        self.dts.append(dt)
        if len(self.dts) == min(self.measure, self.left):
            per_iter = float(np.median(self.dts[len(self.dts) // 2:]))
            self.bar.write(f"{self.stage}: {per_iter:.3f} s per iteration (median of iterations "
                           f"{len(self.dts) // 2 + 1}-{len(self.dts)}): about "
                           f"{per_iter * (self.left - len(self.dts)) / 60:.1f} min to go on this machine, "
                           f"evaluations aside")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _stderr_is_tty():
    return sys.stderr.isatty()


class JsonlLog:
    """A run's log: one JSON object per line, flushed at once so a killed run keeps its log. Master only (enabled=False
    elsewhere: every call does nothing). resume_from: the iteration a resumed run starts from; the rows a killed run
    wrote after its last checkpoint are dropped, so no iteration appears twice; None starts a new log."""

    def __init__(self, path, resume_from=None, enabled=True):
        self.path, self.enabled, self.f = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_from is not None and os.path.exists(path):
            # the checkpoint of iteration N is written after N's evaluation and before N's training step
            kept = [r for r in read_jsonl(path) if "iter" in r and r["iter"] is not None and
                    (r["iter"] < resume_from or (r["iter"] == resume_from and "loss" not in r))]
        write_jsonl(path, kept)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, line=None, **record):
        """Print line (if given) and append record, with a "time" stamp, as one JSON line."""
        if not self.enabled:
            return
        if line is not None:
            tqdm.write(line)  # above a progress bar, when one is on the terminal
        record.setdefault("time", round(time.time(), 3))
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        """Close the file (after which write() must not be called)."""
        if self.f is not None:
            self.f.close()


def read_jsonl(path):
    """The records of a JSONL log (one JSON object per line); a line cut short by a kill is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_log(log_path, png_path, series=(("loss", "train"), ("val_loss", "val")), title="loss", ylabel=None):
    """Plot chosen fields of a JSONL log against 'iter' into a PNG (written atomically). A series of many points is
    drawn faint under its smoothed curve (see smooth). BABYLLAMA_PLOTS=0 draws nothing (the test suite's setting:
    matplotlib's start-up is ~1 s of CPU in each of its ~100 training runs)."""
    if os.environ.get("BABYLLAMA_PLOTS", "1") == "0":
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_jsonl(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in series:
        pts = [(r["iter"], r[key]) for r in records if key in r and r[key] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if len(pts) < 30:
            ax.plot(xs, ys, label=label, marker="o")
            continue
        raw, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=raw.get_color(), label=f"{label} (smoothed)")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel or title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def smooth(values, beta=0.95):
    """Exponential moving average of a sequence, bias-corrected: out[i] = EMA_i / (1 - beta^(i+1))."""
    out, ema = [], 0.0
    for i, v in enumerate(values):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta ** (i + 1)))
    return out


def peak_memory_mb(device_type):
    """Peak memory of this process: allocated CUDA memory on GPUs, the resident set size on CPU (Linux)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def throughput(timer, device_type):
    """The end-of-run figures every script reports: tokens trained on, training seconds (StepTimer's: evaluation, saving
    and warm-up excluded), warm-up seconds, tokens per second, and peak memory in MiB."""
    return dict(train_tokens=timer.tokens, train_seconds=round(timer.seconds, 1),
                warmup_seconds=round(timer.warmup_seconds, 1),
                tokens_per_sec=round(timer.tokens / max(timer.seconds, 1e-9), 1),
                peak_memory_mb=round(peak_memory_mb(device_type), 1))
