"""babyllama/scheduler.py in-process: a request's greedy answer is generate()'s on its prompt alone, whatever joins or
leaves the batch around it; per-row sampling, penalties and seeds; cancellation, the bounded queue and shutdown."""
import threading
import time

import pytest
import torch

from babyllama.generate import generate
from babyllama.scheduler import SHUTDOWN, Closed, QueueFull, Sampling, Scheduler, Sequence
from model import ModelArgs, Transformer

GREEDY = Sampling(temperature=0.0)
STOP = 2  # a stop token of the tests' sequences


def tiny(ctx=64, vocab=300, seed=0, zero_keys=False):
    """A random model whose greedy tokens are far from ties (weights N(0, 0.3)). zero_keys: every query sees every
    earlier token with the same weight, so the answer depends on the whole prompt (a cropped prompt answers
    differently)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=ctx,
                                  multiple_of=16)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            if zero_keys and name.endswith("wk.weight"):
                p.zero_()
    return model


class Collect(Sequence):
    """A sequence that keeps its tokens and says when it ended; hook(seq, token) runs on each token (loop thread)."""

    def __init__(self, prompt, max_tokens, sampling=GREEDY, stop_ids=(), hook=None):
        super().__init__(prompt, max_tokens, sampling, stop_ids)
        self.out, self.reason, self.done, self.hook = [], None, threading.Event(), hook

    def on_token(self, token):
        self.out.append(token)
        return bool(self.hook and self.hook(self, token))

    def on_end(self, reason):
        self.reason = reason
        self.done.set()


def alone(model, prompt, n, stop_ids=()):
    """generate()'s greedy tokens for prompt alone, without the stop token (the scheduler does not hand it on)."""
    out = generate(model, torch.tensor([prompt]), n, temperature=0.0, stop_ids=list(stop_ids))[0]
    return out[:-1] if out and out[-1] in stop_ids else out


def prompts(n, lengths, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def wait_all(seqs, timeout=60):
    for s in seqs:
        assert s.done.wait(timeout), "a request never ended"


@pytest.fixture
def model():
    return tiny()


def test_each_request_answers_as_alone_whatever_its_batch_mates(model):
    """12 requests of different lengths and max_tokens, greedy and sampled ones mixed, arriving while others run."""
    sched = Scheduler(model, max_batch=4, max_queue=16)
    ps = prompts(12, [1, 5, 17, 30, 2, 41, 9, 12])
    max_tokens = [min(63 - len(p), n) for p, n in zip(ps, [20, 33, 8, 25, 50, 12, 40, 3, 30, 19, 22, 27])]
    sampled = [Sampling(temperature=1.0, top_p=0.9), Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.3)]
    seqs = []
    for i, (p, n) in enumerate(zip(ps, max_tokens)):
        seqs.append(Collect(p, n, sampled[i // 3 % 3] if i % 3 == 2 else GREEDY, stop_ids=[STOP]))
        sched.submit(seqs[-1])
        time.sleep(0.002 * (i % 4))  # some join a running batch, some arrive together
    wait_all(seqs)
    for s, p, n in zip(seqs, ps, max_tokens):
        if s.sampling is GREEDY:
            assert s.out == alone(model, p, n, [STOP]), f"prompt of {len(p)} tokens answered differently in a batch"
        assert s.reason in ("stop", "length") and len(s.out) <= n
        assert (s.reason == "length") == (len(s.out) == n)
    st = sched.stats()
    assert st["row_steps"] > st["steps"] and st["finished"] == 12 and st["running"] == st["waiting"] == 0


def test_a_long_prompt_answers_the_same_beside_a_request_for_many_more_tokens():
    """Issue 23's case: a 100-token prompt with max_tokens 8 on a context-128 model, batched with a request for 60
    tokens, is not cropped to 128 - 60 tokens; the model answers differently to the cropped prompt, so a crop shows."""
    model = tiny(ctx=128, zero_keys=True)
    long_prompt, short = prompts(2, [100, 10], seed=3)
    want = alone(model, long_prompt, 8)
    assert want != alone(model, long_prompt[-68:], 8)  # the test can see a crop
    sched = Scheduler(model, max_batch=4)
    a, b = Collect(long_prompt, 8), Collect(short, 60)
    for s in (b, a):
        sched.submit(s)
    wait_all([a, b])
    assert a.out == want and b.out == alone(model, short, 60)


def test_a_request_that_joins_a_running_batch_gets_its_lone_answer_and_the_cache_moves_left(model, monkeypatch):
    """B is submitted from A's 5th token (so it joins mid-batch for sure), C from B's 20th; the batch stays busy for
    more steps than the cache has spare columns, so its columns move left at least once."""
    moves = []
    monkeypatch.setattr(Scheduler, "_compact", lambda self, f=Scheduler._compact: (moves.append(self.cur), f(self)))
    sched = Scheduler(model, max_batch=4)
    pa, pb, pc = prompts(3, [7, 23, 40], seed=5)
    c = Collect(pc, 23)
    b = Collect(pb, 40, hook=lambda s, t: len(s.out) == 20 and sched.submit(c))
    a = Collect(pa, 50, hook=lambda s, t: len(s.out) == 5 and sched.submit(b))
    sched.submit(a)
    wait_all([a, b, c])
    assert (a.out, b.out, c.out) == (alone(model, pa, 50), alone(model, pb, 40), alone(model, pc, 23))
    assert moves, "the cache never filled: the test did not cover its compaction"


def test_rows_with_other_sampling_settings_do_not_change_a_greedy_row(model):
    ps = prompts(4, [12, 30, 5, 20], seed=7)
    settings = [GREEDY, Sampling(temperature=1.5, top_k=50), Sampling(temperature=0.9, top_p=0.5, seed=3),
                Sampling(temperature=0.0, frequency_penalty=1.0)]
    sched = Scheduler(model, max_batch=4)
    seqs = [Collect(p, 30, s) for p, s in zip(ps, settings)]
    for s in seqs:
        sched.submit(s)
    wait_all(seqs)
    assert seqs[0].out == alone(model, ps[0], 30)


def test_seeded_samples_repeat_alone_and_batched(model):
    p, other = prompts(2, [15, 25], seed=9)
    s7 = Sampling(temperature=1.0, top_p=0.95, seed=7)
    sched = Scheduler(model, max_batch=4)

    def run(batch):
        for s in batch:
            sched.submit(s)
        wait_all(batch)
        return batch[0].out

    first = run([Collect(p, 30, s7)])
    assert run([Collect(p, 30, s7)]) == first  # alone: exactly generate's computation, the same draws
    assert run([Collect(p, 30, s7), Collect(other, 30, Sampling(temperature=1.0))]) == first
    assert run([Collect(p, 30, Sampling(temperature=1.0, top_p=0.95, seed=8))]) != first  # the seed is used


def naive_penalised_greedy(model, prompt, n, frequency, presence):
    """OpenAI's penalties written out independently: the whole sequence forward each step (no cache), then
    logit[j] -= count[j] * frequency + (count[j] > 0) * presence over the tokens generated so far; argmax."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0][0, -1].float()
            for j in set(out):
                logits[j] -= out.count(j) * frequency + presence
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out


def test_frequency_and_presence_penalties_are_openai_s(model):
    p = prompts(1, [10], seed=11)[0]
    settings = Sampling(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5)
    sched = Scheduler(model, max_batch=2)
    s, plain = Collect(p, 40, settings), Collect(p, 40)
    sched.submit(s)
    sched.submit(plain)
    wait_all([s, plain])
    assert s.out == naive_penalised_greedy(model, p, 40, 1.5, 0.5)
    assert s.out != plain.out  # the penalties changed something


def test_a_cancelled_request_frees_its_row_at_the_next_step(model):
    """A is cancelled at its 3rd token; it gets no 4th, and B, waiting for the only row, then gets it."""
    sched = Scheduler(model, max_batch=1)
    pa, pb = prompts(2, [10, 10], seed=13)

    def cancel_at_3(s, t):
        if len(s.out) == 3:
            s.cancelled = True  # as an HTTP handler does when its client goes away
    a, b = Collect(pa, 50, hook=cancel_at_3), Collect(pb, 5)
    sched.submit(a)
    sched.submit(b)
    wait_all([a, b])
    assert a.reason == "cancelled" and len(a.out) == 3
    assert b.reason == "length" and b.out == alone(model, pb, 5)
    assert sched.stats()["cancelled"] == 1


def test_submit_never_blocks_and_refuses_beyond_max_queue(model):
    sched = Scheduler(model, max_batch=1, max_queue=2)
    started = threading.Event()
    slow = Collect([5] * 10, 50, hook=lambda s, t: started.set() or time.sleep(0.02))
    sched.submit(slow)
    assert started.wait(10)
    waiting = [Collect([6] * 5, 3), Collect([7] * 5, 3)]
    for s in waiting:
        sched.submit(s)
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as refused:
        sched.submit(Collect([8] * 5, 3))
    assert time.monotonic() - t0 < 0.05 and refused.value.retry_after >= 1
    slow.cancelled = True
    wait_all([slow] + waiting)
    assert [s.reason for s in waiting] == ["length", "length"]
    with pytest.raises(ValueError):  # a sequence that cannot fit the context is refused, not cropped
        sched.submit(Collect([5] * 60, 5))
    # sampling settings are checked once, here, since the decoding step samples without checks
    for bad in (Sampling(temperature=float("nan")), Sampling(top_p=1.5), Sampling(top_k=-1)):
        with pytest.raises(ValueError):
            sched.submit(Collect([5] * 5, 3, bad))
    assert sched.stats()["requests"] == 3  # the slow one and the two waiting: no refused one was queued


def test_close_ends_running_and_waiting_requests_within_grace(model):
    sched = Scheduler(model, max_batch=1)
    started = threading.Event()
    slow = Collect([5] * 10, 50, hook=lambda s, t: started.set() or time.sleep(0.05))
    waiting = Collect([6] * 10, 5)
    sched.submit(slow)
    assert started.wait(10)
    sched.submit(waiting)
    t0 = time.monotonic()
    sched.close(grace=0.3)
    with pytest.raises(Closed):
        sched.submit(Collect([7] * 5, 3))
    wait_all([slow, waiting], timeout=5)
    assert sched.join(timeout=5) and time.monotonic() - t0 < 1.5
    assert slow.reason == waiting.reason == SHUTDOWN and len(slow.out) < 50


def test_a_failing_consumer_ends_its_own_request_only(model):
    pa, pb = prompts(2, [10, 12], seed=17)

    def fail(s, t):
        if len(s.out) == 4:
            raise RuntimeError("consumer broke")
    sched = Scheduler(model, max_batch=2)
    a, b = Collect(pa, 20, hook=fail), Collect(pb, 20)
    sched.submit(a)
    sched.submit(b)
    wait_all([a, b])
    assert a.reason.startswith("error: RuntimeError") and b.out == alone(model, pb, 20)
