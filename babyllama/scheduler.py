"""Continuous batching: one loop thread decodes every running request, each as if it ran alone (serve.py's engine).

A request (a Sequence: prompt ids, max_tokens, its own sampling settings and stop ids) waits in a bounded inbox
until a row of the batch is free, then joins at the next decoding step: its prompt is prefilled on its own into
its row of the KV cache, and from then on it decodes one token per step with the other rows. It leaves at a stop
token, at its max_tokens, when its consumer says so (a stop string) or when it is cancelled; its row goes to the
next request at once. Nothing of a request depends on its batch-mates: not its prompt, its length or its sampling.

The KV cache is one (max_batch, n_kv_heads, L, head_dim) buffer per layer, L a quarter over max_seq_len. Every
running row's keys end at the same column `cur` (a step writes one column for every row), so a step is one
batched forward with one cache position; a row's keys start at its own column (`start`), its RoPE positions count
from 0 there, and a mask hides the columns left of it. A prompt of P tokens is written at [cur - P, cur), so cur
never goes below max_seq_len; when cur reaches L the live columns move left (once per L - max_seq_len steps).
A row that leaves is replaced by the last row (a copy of its cache row): rows 0..n-1 are the running ones and a
step's caches are plain views.

Numerics: a prefill is the very computation generate() does for the prompt alone; a decoding step differs from
the lone one only by masked-out keys and the batch size of the matmuls, which can change the last bits of the
logits (greedy tokens agree unless two logits tie to those bits). A row running alone is generate() exactly.

Threads: submit() never blocks (QueueFull when max_queue requests wait, Closed after close()); the loop never
waits on a queue (it pops a deque, and waits on an Event with a timeout only when it has nothing to do). Set
seq.cancelled from any thread: the row is freed before the next step."""
import collections
from contextlib import nullcontext
from dataclasses import dataclass
import math
import threading
import time
from typing import Optional

import torch

from babyllama.generate import check_sampling_args, sample_checked_once, stacked_weights

SHUTDOWN = "error: the server is shutting down"  # the end reason of what close() cuts short


@dataclass(frozen=True)
class Sampling:
    """How one request chooses its tokens: temperature 0 (or top_k 1, or top_p 0) = greedy; top_k 0 = off;
    frequency/presence penalties as OpenAI's (subtracted from the logits of tokens generated so far: count x
    frequency_penalty + presence_penalty); seed None = the global RNG, else a generator of its own."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None

    @property
    def greedy(self):
        return self.temperature == 0.0 or self.top_k == 1 or self.top_p == 0.0


class Sequence:
    """One request to decode: prompt (token ids), max_tokens (>= 1; len(prompt) + max_tokens <= the context),
    sampling, stop_ids (tokens that end it; they are not handed to on_token). Subclass on_token and on_end to
    receive the output; both are called from the loop thread and must not block."""

    def __init__(self, prompt, max_tokens, sampling=Sampling(), stop_ids=()):
        self.prompt, self.max_tokens, self.sampling = list(prompt), int(max_tokens), sampling
        self.stop_ids = set(stop_ids)
        self.cancelled = False  # set by any thread: the row is freed before the next step
        self.n_generated = 0
        self.start = self.last = 0  # the first cache column of its keys; the token to feed next
        self.generator = self.counts = None
        self.began = 0.0

    def on_token(self, token):
        """A new token id (int). Return True to end the sequence after it (finish reason 'stop')."""
        return False

    def on_end(self, reason):
        """Called once at the end: reason 'stop', 'length', 'cancelled' or 'error: <what happened>'."""


class QueueFull(Exception):
    """max_queue requests are waiting; retry_after: seconds until a place is likely free (>= 1)."""

    def __init__(self, retry_after):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The scheduler is shutting down and takes no new request."""


class Scheduler:
    """The loop thread that owns the model: submit(seq) from any thread; close(grace) to stop; stats()."""

    def __init__(self, model, max_batch=8, max_queue=64, autocast_ctx=None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.autocast_ctx = autocast_ctx or nullcontext()
        self.ctx = model.args.max_seq_len
        self.length = self.ctx + max(16, self.ctx // 4)  # cache columns: the room to decode before moving left
        self.device = model.tok_embeddings.weight.device
        self.inbox = collections.deque()  # submitted, not running yet; only under self.lock
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.rows = []  # the running sequences; rows[i]'s keys live in cache row i (the loop thread only)
        self.cur = self.ctx
        self.deadline = None  # set by close(): when what still runs is cancelled
        self.row_seconds = 1.0  # a running mean of how long a request holds a row (for Retry-After)
        self.counters = dict(requests=0, steps=0, row_steps=0, tokens=0, finished=0, cancelled=0, errors=0)
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # ---- any thread ------------------------------------------------------------------------------------------

    def submit(self, seq):
        """Queue seq; never blocks. ValueError for a sequence that does not fit the context; QueueFull; Closed."""
        if not 1 <= len(seq.prompt) or len(seq.prompt) + seq.max_tokens > self.ctx or seq.max_tokens < 1:
            raise ValueError(f"prompt {len(seq.prompt)} + max_tokens {seq.max_tokens} must fit the context {self.ctx}")
        s = seq.sampling  # checked here once, so the decoding step samples without checks
        check_sampling_args(s.temperature, s.top_k or None, s.top_p, 1.0)
        with self.lock:
            if self.deadline is not None:
                raise Closed("the server is shutting down")
            if len(self.inbox) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self.inbox.append(seq)
            self.counters["requests"] += 1
        self.wake.set()

    def retry_after(self):
        """Seconds until the queue has likely moved by one place: a row's mean time per round of the batch."""
        rounds = len(self.inbox) / self.max_batch + 1
        return max(1, math.ceil(rounds * self.row_seconds))

    def close(self, grace=2.0):
        """Take no new request; what runs or waits may finish within grace seconds, then it is ended with
        SHUTDOWN. Returns at once (the loop sees it within 0.1 s); the loop thread then ends (see join)."""
        # no lock and no Event here: a signal handler calls this on a thread that may hold them (submit)
        if self.deadline is None:
            self.deadline = time.monotonic() + grace

    def join(self, timeout=None):
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stats(self):
        """Counters (requests submitted, decoding steps, rows summed over steps, tokens generated, requests
        finished / cancelled / failed) and the present state (running, waiting)."""
        with self.lock:
            waiting = len(self.inbox)
        return dict(self.counters, running=len(self.rows), waiting=waiting, max_batch=self.max_batch)

    # ---- the loop thread -------------------------------------------------------------------------------------

    def _loop(self):
        with torch.inference_mode(), self.autocast_ctx:
            self.cache = self._allocate()
            self.fused = stacked_weights(self.model)
            while not self._shut_down():
                self._drop_cancelled()
                self._admit()
                if self.rows:
                    self._guarded(self._step)
                else:
                    self.wake.wait(0.1)  # idle: sleep until a submit (or close) sets it
                    self.wake.clear()

    def _allocate(self):
        m = self.model
        shape = (self.max_batch, m.layers[0].attention.n_kv_heads, self.length, m.args.dim // m.args.n_heads)
        dtype = m.tok_embeddings.weight.dtype
        return [(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype,
                                                                                 device=self.device))
                for _ in m.layers]

    def _shut_down(self):
        """After close(): True (and every request ended) once nothing is left or the grace time is over."""
        if self.deadline is None:
            return False
        with self.lock:
            if (self.rows or self.inbox) and time.monotonic() < self.deadline:
                return False
            waiting, self.inbox = list(self.inbox), collections.deque()
        for seq in waiting + self.rows:
            self._end(seq, SHUTDOWN)
        self.rows = []
        return True

    def _drop_cancelled(self):
        with self.lock:
            gone = [s for s in self.inbox if s.cancelled]
            if gone:
                self.inbox = collections.deque(s for s in self.inbox if not s.cancelled)
        for seq in gone:
            self._end(seq, "cancelled")
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self._end(self.rows[i], "cancelled")
                self._free(i)

    def _admit(self):
        """Move waiting requests into the free rows, prefilling each prompt on its own."""
        while len(self.rows) < self.max_batch:
            with self.lock:
                if not self.inbox:
                    return
                seq = self.inbox.popleft()
            self._guarded(self._prefill, seq)

    def _guarded(self, work, seq=None):
        """work(seq) or work(); an exception ends seq (or every running row) with the error instead of the loop."""
        try:
            work(seq) if seq is not None else work()
        except Exception as e:  # answer the clients rather than leave them waiting; the loop goes on
            failed = [seq] if seq is not None else self.rows
            for s in failed:
                self._end(s, f"error: {type(e).__name__}: {e}")
            self.rows = [r for r in self.rows if r not in failed]
            if not self.rows:
                self.cur = self.ctx

    def _prefill(self, seq):
        """Run seq's prompt alone into the next free cache row, ending at column cur, and choose its first token."""
        i, P = len(self.rows), len(seq.prompt)
        seq.began = time.monotonic()
        seq.start = self.cur - P
        s = seq.sampling
        if s.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        if s.frequency_penalty or s.presence_penalty:
            seq.counts = torch.zeros(self.model.args.vocab_size, device=self.device)
        tokens = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        pos = torch.arange(P, device=self.device)[None]
        caches = [(k[i:i + 1, :, seq.start:self.cur], v[i:i + 1, :, seq.start:self.cur]) for k, v in self.cache]
        logits = self.model._forward_positions(tokens, pos, None, caches, 0, self.fused)[:, -1].float()
        self.rows.append(seq)
        if self._advance(seq, self._choose([seq], logits)[0]):
            self._free(len(self.rows) - 1)

    def _step(self):
        """One decoding step: every running row feeds its last token at column cur and chooses its next one."""
        if self.cur == self.length:
            self._compact()
        n = len(self.rows)
        starts = torch.tensor([r.start for r in self.rows])
        lo = int(starts.min())
        tokens = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        pos = (self.cur - starts)[:, None].to(self.device)
        mask = None  # rows that start together need none (a row alone is then generate()'s own decode step)
        if bool((starts != lo).any()):
            mask = (torch.arange(lo, self.cur + 1) >= starts[:, None])[:, None, None, :].to(self.device)
        caches = [(k[:n, :, lo:], v[:n, :, lo:]) for k, v in self.cache]
        logits = self.model._forward_positions(tokens, pos, mask, caches, self.cur - lo, self.fused)[:, -1].float()
        self.cur += 1
        self.counters["steps"] += 1
        self.counters["row_steps"] += n
        chosen = self._choose(self.rows, logits)
        done = [i for i, (seq, t) in enumerate(zip(self.rows, chosen)) if self._advance(seq, t)]
        for i in reversed(done):
            self._free(i)

    def _choose(self, seqs, logits):
        """The next token of each sequence from its logits (n, V): argmax for the greedy ones, a draw with its
        own settings (and generator) for the others. One host sync for the whole batch."""
        chosen = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            s = seq.sampling
            row = logits[i:i + 1]
            if seq.counts is not None:
                row = row - s.frequency_penalty * seq.counts - s.presence_penalty * (seq.counts > 0).float()
            if seq.counts is not None or not s.greedy:
                chosen[i] = sample_checked_once(row, s.temperature, s.top_k or None, s.top_p, 1.0, None,
                                                seq.generator)[0]
        return chosen.tolist()

    def _advance(self, seq, token):
        """Hand token to seq; True when seq is finished (stop token, its max_tokens, a stop string)."""
        seq.last = token
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in seq.stop_ids:
            return self._end(seq, "stop")
        seq.n_generated += 1
        self.counters["tokens"] += 1
        try:
            stop = seq.on_token(token)
        except Exception as e:  # this request's consumer failed: end it, not its batch-mates
            return self._end(seq, f"error: {type(e).__name__}: {e}")
        if stop:
            return self._end(seq, "stop")
        if seq.n_generated >= seq.max_tokens:
            return self._end(seq, "length")
        return False

    def _end(self, seq, reason):
        self.counters["cancelled" if reason == "cancelled" else "errors" if reason.startswith("error") else
                      "finished"] += 1
        if seq.began:
            self.row_seconds = 0.9 * self.row_seconds + 0.1 * (time.monotonic() - seq.began)
        try:
            seq.on_end(reason)
        except Exception:  # a consumer that fails must not take the loop down with it
            pass
        return True

    def _free(self, i):
        """Remove row i; the last row moves into its cache row so that rows 0..n-1 stay the running ones."""
        last = len(self.rows) - 1
        if i != last:
            a = self.rows[last].start
            for k, v in self.cache:
                k[i, :, a:self.cur] = k[last, :, a:self.cur]
                v[i, :, a:self.cur] = v[last, :, a:self.cur]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.cur = self.ctx  # an empty batch starts afresh

    def _compact(self):
        """Move every row's keys left by cur - max_seq_len columns (a row's keys span fewer than max_seq_len)."""
        d = self.cur - self.ctx
        lo, n = min(r.start for r in self.rows), len(self.rows)
        for k, v in self.cache:
            k[:n, :, lo - d:self.cur - d] = k[:n, :, lo:self.cur].clone()
            v[:n, :, lo - d:self.cur - d] = v[:n, :, lo:self.cur].clone()
        for r in self.rows:
            r.start -= d
        self.cur -= d
