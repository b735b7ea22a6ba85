"""What the tests share, written once: the environment and one runner for the scripts as users run them (python
SCRIPT --key=value ...), the tiny model shapes, the tiny tokenizer, the small files the tests feed the scripts,
and the comparisons of two training runs.

tests/unit: in-process tests, one file per library module (and model.py). tests/scripts: tests of one root script
or package command line each (run as a subprocess, under torchrun or with python -m; a script's own functions are
tested there too). tests/test_structure.py: the layout rules of ARCHITECTURE.md, on the whole tree. The repository
root is on sys.path through pytest.ini (pythonpath); this folder through pytest itself (unit/ and scripts/ are
packages, so a library module and its script may share a test file's name, and the first folder above them that
is not is this one), so a test imports `from conftest import ...` and `from read_set import ...`."""
import csv
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_model
import torch

from babyllama import checkpoint_io, runlog
from babyllama.dist import free_port
from babyllama.models import save_merged
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from tokenizer.train_tokenizer import train_tokenizer
from fork_server import run_forked
from tokenizer_files import published, qwen2_pipeline, train_byte_level, train_dummy_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread per process: two processes x two threads on two cores spin-wait each other into the ground
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
# no loss plots (matplotlib's start-up costs ~1 s of CPU per training run) except where a test asks for them
ENV["BABYLLAMA_PLOTS"] = "0"
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# torchrun's environment for 2 processes, without torchrun (2.5 s sooner a launch): tests/two_processes.py
TWO_PROCESSES = [sys.executable, os.path.join(ROOT, "tests", "two_processes.py")]
CPU = ["--num_threads=1", "--dtype=float32", "--device=cpu"]  # the flags of every training run here


def run_script(script, *args, launcher=None, check=True, input=None, timeout=300, plots=False, env=None):
    """Run a repository script (e.g. "pretrain.py" or "-m", "clean_data") from the repository root, the way a user
    would: forked from this worker's fork server (tests/fork_server.py: torch already imported), or, with a launcher
    or an env of its own (read at interpreter start-up), in a fresh interpreter. plots: also draw the loss PNGs; env:
    instead of ENV. Returns the CompletedProcess; with check, a non-zero exit fails the test showing the end of stdout
    and stderr."""
    argv = [script, *map(str, args)]
    cmd = (launcher or [sys.executable]) + argv
    if launcher is None and env is None:
        p = run_forked(argv, dict(ENV, BABYLLAMA_PLOTS="1") if plots else ENV, ROOT, input, timeout)
    else:
        p = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, input=input,
                           timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def single_thread():
    """One intra-op thread while the test runs (then the setting it found): for tiny models, more threads only
    spin-wait on a shared 2-core box (the overfit test: 45 s with 2 threads, 4 s with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- tiny models ---------------------------------------------------------------------------------------------

# the unit tests' model (grouped-query attention, tied embeddings): a forward pass in milliseconds. A test
# overrides what it needs, e.g. tiny_model(vocab_size=300, max_seq_len=32)
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
# smaller still, for the LoRA and checkpoint tests
SMALL_ARGS = dict(TINY_ARGS, dim=32, vocab_size=64, max_seq_len=16)


def tiny_model(seed=0, **overrides):
    """A Transformer of TINY_ARGS with overrides, initialised after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**dict(TINY_ARGS, **overrides)))


def spread_weights_(model, seed, std=0.1):
    """Overwrite every parameter in place (a tied output stays tied), from a generator seeded seed: 1-D (norm)
    weights 1 + N(0, 0.3), matrices N(0, std) rather than the 0.02 init. The logits are spread, so greedy argmax
    is never decided by float round-off, and a mistake in a norm, RoPE or the head layout shows. Returns model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else std * torch.randn(p.shape, generator=g))
    return model


# ---- the tiny tokenizer, and what sft.py and dpo.py start from -----------------------------------------------

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "请写一首题为《静夜思》的诗。《静夜思》的作者是谁？",
         "《静夜思》的作者是李白。你好，我是助手。今天天气很好。", "What is two plus two? It is four. Hello!",
         "续写：这首诗的作者是谁？王之涣孟浩然"] * 20
# the chat tests' model (vocab_size: the tokenizer's): a tiny one still able to learn a few replies verbatim
CHAT_ARGS = dict(dim=64, n_layers=2, n_heads=4, max_seq_len=64)

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
# conversations with a system prompt, two turns and replies of different lengths
CONVERSATIONS = [
    {"system": None, "messages": [U("《静夜思》的作者是谁？"), A("《静夜思》的作者是李白。")]},
    {"system": None, "messages": [U("续写：床前明月光，"), A("疑是地上霜。举头望明月，低头思故乡。")]},
    {"system": "你是助手。", "messages": [U("你好"), A("你好，我是助手。")]},
    {"system": None, "messages": [U("请写一首题为《登鹳雀楼》的诗。"), A("白日依山尽，黄河入海流。"),
                                  U("这首诗的作者是谁？"), A("王之涣。")]},
]
PAIRS = [{"prompt": "你好", "chosen": "你好。", "rejected": "好。"},
         {"prompt": "《静夜思》的作者是谁？", "chosen": "《静夜思》的作者是李白。", "rejected": "王之涣。"},
         {"prompt": "续写：床前明月光，", "chosen": "疑是地上霜。举头望明月，低头思故乡。", "rejected": "疑是地上霜。"},
         {"prompt": "请写一首题为《登鹳雀楼》的诗。", "chosen": "白日依山尽，黄河入海流。", "rejected": "白日依山尽。白日依山尽。"}]


def tiny_tokenizer(d):
    """A 400-piece tokenizer trained on TEXTS, written to folder d (tok.model)."""
    return Tokenizer(train_tokenizer(iter(TEXTS), str(d / "tok"), 400, num_threads=1, verbose=False))


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """tiny_tokenizer, trained once per test process."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def wide_tokenizer(d, vocab_size=70_000):
    """tiny_tokenizer with vocab_size - 400 unused pieces inserted after its byte pieces (written to folder d,
    wide.model): a real sentencepiece model of a vocabulary over uint16 whose learned pieces, and so the ids of any
    text, are above 65,535 (the unused ones are never produced), while its specials keep their low ids."""
    tok = tiny_tokenizer(d)
    m = sp_model.ModelProto()
    m.ParseFromString(open(tok.model_path, "rb").read())
    pieces = list(m.pieces)
    first = 1 + max(i for i, p in enumerate(pieces) if p.type == sp_model.ModelProto.SentencePiece.BYTE)
    unused = [sp_model.ModelProto.SentencePiece(piece=f"<unused_{i}>", score=0.0,
                                                type=sp_model.ModelProto.SentencePiece.UNUSED)
              for i in range(vocab_size - len(pieces))]
    del m.pieces[:]
    m.pieces.extend(pieces[:first] + unused + pieces[first:])
    (d / "wide.model").write_bytes(m.SerializeToString())
    return Tokenizer(d / "wide.model")


def chat_model(tok, seed=0):
    """(a Transformer of CHAT_ARGS for tok's vocabulary initialised after torch.manual_seed(seed), its
    model_args dict)."""
    args = dict(CHAT_ARGS, vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**args)), args


def write_chat_files(d, tok):
    """Folder d with a base checkpoint of chat_model(tok) naming its tokenizer (base.pt), CONVERSATIONS
    (train.jsonl) and PAIRS (pairs.jsonl). Returns d."""
    model, args = chat_model(tok)
    checkpoint_io.save(str(d / "base.pt"), {"model": model.state_dict(), "model_args": args, "iter_num": 0,
                                            "config": {}, "tokenizer": tok.model_path,
                                            "tokenizer_sha256": tok.sha256()})
    write_jsonl(d / "train.jsonl", [dict(c, source="t") for c in CONVERSATIONS])
    write_jsonl(d / "pairs.jsonl", PAIRS)
    return d


@pytest.fixture(scope="session")
def chat_files(tiny_tok, tmp_path_factory):
    """write_chat_files, once per test process: tests write their runs elsewhere (tmp_path)."""
    return write_chat_files(tmp_path_factory.mktemp("chat"), tiny_tok)


def finetune(script, chat, out, *extra, launcher=None):
    """script (sft.py or dpo.py) from chat's base.pt: 3 iterations of 4 micro-steps of one sample, no held-out
    data (the FSDP tests' run); launcher: e.g. TWO_PROCESSES."""
    run_script(script, f"--init_ckpt={chat / 'base.pt'}", f"--out_dir={out}", "--val_data=", "--max_iters=3", *CPU,
               "--warmup_iters=0", "--learning_rate=3e-3", "--batch_size=1", "--gradient_accumulation_steps=4",
               "--eval_interval=100", *extra, launcher=launcher)


# ---- pretraining runs ------------------------------------------------------------------------------------------

# pretrain.py's flags for a tiny model trained in a second or two (the default accumulation: 4 micro-steps)
TINY_PRETRAIN = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=32", "--batch_size=2",
                 "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", *CPU]


def write_motif_bins(d, vocab_size, top_id, n_motifs, max_len, n_draws, n_val):
    """train.bin, val.bin (its first n_val tokens) and meta.json (vocab_size) in folder d: a token corpus with
    structure to learn, n_draws motifs (5..max_len-1 ids in 4..top_id-1) drawn from n_motifs in random order."""
    rng = np.random.default_rng(0)
    motifs = [rng.integers(4, top_id, size=rng.integers(5, max_len)) for _ in range(n_motifs)]
    stream = np.concatenate([motifs[i] for i in rng.integers(0, n_motifs, size=n_draws)]).astype(np.uint16)
    stream.tofile(d / "train.bin")
    stream[:n_val].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return d


@pytest.fixture(scope="session")
def motif_bins(tmp_path_factory):
    """Token files of a 256-token vocabulary for TINY_PRETRAIN runs, written once per test process."""
    return write_motif_bins(tmp_path_factory.mktemp("bins"), 256, 200, n_motifs=30, max_len=20, n_draws=2000,
                            n_val=4000)


def pretrain(bins, out, *extra, **kw):
    """pretrain.py with TINY_PRETRAIN on the token files in folder bins, writing to out; run_script's kw."""
    return run_script("pretrain.py", *TINY_PRETRAIN, f"--train_data={bins / 'train.bin'}",
                      f"--val_data={bins / 'val.bin'}", f"--out_dir={out}", *extra, **kw)


# ---- comparing runs --------------------------------------------------------------------------------------------

def train_losses(out_dir):
    """{iteration: training loss} from a run's log.jsonl."""
    return {r["iter"]: r["loss"] for r in runlog.read_jsonl(os.path.join(out_dir, "log.jsonl")) if "loss" in r}


def saved_at(out_dir):
    """The iterations at which a run wrote its checkpoint (the log records each write)."""
    return [r["iter"] for r in runlog.read_jsonl(os.path.join(out_dir, "log.jsonl")) if "checkpoint" in r]


def assert_same_run(ref_dir, ref_ckpt, other_dir, other_ckpt, tol, weight_tol=None, key="model"):
    """The same training losses at every iteration to tol, a run that trained (its last loss below its first: equal
    weights are not the initial ones), and the same final weights (checkpoint entry key) to weight_tol
    (default tol)."""
    a, b = train_losses(ref_dir), train_losses(other_dir)
    assert sorted(a) == sorted(b) and len(a) >= 2
    for it in a:
        assert abs(a[it] - b[it]) <= tol, (it, a[it], b[it])
    assert a[max(a)] < a[0]
    w1 = checkpoint_io.load(str(ref_dir / ref_ckpt))[key]
    w2 = checkpoint_io.load(str(other_dir / other_ckpt))[key]
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=weight_tol or tol, rtol=0), k


def first_gradient(out_dir):
    """AdamW's first moment after one step is (1 - beta1) x the gradient: the checkpoint holds the gradient."""
    state = checkpoint_io.load(str(out_dir / "ckpt.pt"))["optimizer"]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)]) / (1 - 0.9)


def assert_same_gradient_however_the_batch_is_split(script, chat, tmp_path, extra):
    """One iteration of 4 samples of script (sft.py or dpo.py) from chat's base.pt, as batch 4 x 1 micro-step,
    1 x 4, and 2 processes x 1 x 2: the same first gradient to a relative 1e-5."""
    splits = {"4x1": ["--batch_size=4", "--gradient_accumulation_steps=1"],
              "1x4": ["--batch_size=1", "--gradient_accumulation_steps=4"],
              "2x1x2": ["--batch_size=1", "--gradient_accumulation_steps=4"]}
    grads = {}
    for name, split in splits.items():
        out = tmp_path / name
        run_script(script, f"--init_ckpt={chat / 'base.pt'}", f"--out_dir={out}", "--val_data=", "--max_iters=1",
                   *CPU, "--grad_clip=0.0", "--warmup_iters=0",
                   "--n_samples=0" if script == "dpo.py" else "--pack=False", *extra, *split,
                   launcher=TWO_PROCESSES if name == "2x1x2" else None)
        grads[name] = first_gradient(out)
    ref = grads.pop("4x1")
    for name, g in grads.items():
        err = (g - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-5, (name, err)


# ---- small input files -----------------------------------------------------------------------------------------

def snapshot(d):
    """{file name: bytes} of every file in folder d (empty when d does not exist)."""
    if not os.path.isdir(d):
        return {}
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def write_jsonl(path, records):
    """records, one JSON line each (UTF-8, not escaped), to path."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def non_utf8_jsonl(path, first, last):
    """Two good records as lines 1 and 3, and a line that is not UTF-8 between them (line 2)."""
    line = lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n"
    path.write_bytes(line(first) + b'{"text": "\xff\xfe"}\n' + line(last))


def write_documents(d, n=6):
    """n distinct documents in d/in.jsonl ({"text": ...}), long enough for every clean_data filter."""
    d.mkdir(parents=True, exist_ok=True)
    texts = [f"第{i}篇：" + "".join(chr(0x4E00 + (i * 37 + k * 11) % 400) for k in range(60)) for i in range(n)]
    return write_jsonl(d / "in.jsonl", [{"text": t} for t in texts])


# (title, author, text) of regular poems, and one that is not (the last)
QUATRAINS = [("靜夜思", "李白", "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"),
             ("登鸛雀樓", "王之渙", "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"),
             ("春曉", "孟浩然", "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"),
             ("江雪", "柳宗元", "千山鳥飛絕，萬徑人蹤滅。\n孤舟蓑笠翁，獨釣寒江雪。"),
             ("壞詩", "某", "這不是一首，規整的詩")]


def write_poems(path, poems=QUATRAINS):
    """(title, author, text) tuples as a chinese-poetry file (poet.tang.N.json's layout) at path."""
    path.write_text(json.dumps([{"title": t, "author": a, "paragraphs": b.split("\n")} for t, a, b in poems],
                               ensure_ascii=False), encoding="utf-8")
    return path


# records of the chinese-poetry package's variants (title, rhythmic or chapter; one without a body: skipped and
# counted), and the documents the readers make of them
POETRY_RECORDS = [
    {"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
    {"rhythmic": "如梦令", "author": "李清照", "paragraphs": ["常记溪亭日暮，", "", "沉醉不知归路。"]},
    {"chapter": "学而篇", "paragraphs": ["子曰：学而时习之，不亦说乎？"]},
    {"title": "空诗", "author": "无名", "paragraphs": []},
]
POETRY_TEXTS = ["静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
                "如梦令\n李清照\n常记溪亭日暮，\n沉醉不知归路。",
                "学而篇\n子曰：学而时习之，不亦说乎？"]


# ---- exam files (C-Eval's layout) --------------------------------------------------------------------------------

QUESTIONS = [  # (question, options, answer): hand-written, short, characters the tiny tokenizer knows
    ("床前明月光的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "A"),
    ("白日依山尽的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "B"),
    ("春眠不觉晓的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "C"),
    ("夜来风雨声的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "D"),
    ("静夜思的作者是谁", ["李白", "王之涣", "孟浩然", "助手"], "A"),
]


def write_csv(path, rows, header=("id", "question", "A", "B", "C", "D", "answer")):
    """rows under header as a CSV file at path (its folders made). Returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_exam(d, subjects=("poems", "authors"), n_dev=3):
    """<d>/val/<subject>_val.csv (QUESTIONS) and <d>/dev/<subject>_dev.csv, whose questions carry a marker naming
    them (<subject>样例<i>号). Returns d."""
    for s in subjects:
        write_csv(d / "val" / f"{s}_val.csv", [(i, q, *o, a) for i, (q, o, a) in enumerate(QUESTIONS)])
        write_csv(d / "dev" / f"{s}_dev.csv", [(i, f"{s}样例{i}号", "甲", "乙", "丙", "丁", "ABCD"[i % 4])
                                                for i in range(n_dev)])
    return d


# ---- what the RL scripts start from ------------------------------------------------------------------------------

JING_YE_SI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
# the RL runs' tiny policy (vocab_size: the tokenizer's)
RL_ARGS = dict(dim=32, n_kv_heads=None, max_seq_len=48)


@pytest.fixture(scope="session")
def rl_files(tiny_tok, tmp_path_factory):
    """(folder, flags): an SFT checkpoint of tiny_model(0, **RL_ARGS) (sft.pt), nine poem requests (q.jsonl, the
    training and the held-out prompts), and grpo.py's flags for a run that rewards the share of "月" in a reply."""
    d = tmp_path_factory.mktemp("rl")
    save_merged(str(d / "sft.pt"), tiny_model(0, vocab_size=tiny_tok.vocab_size, **RL_ARGS), iter_num=0, config={},
                tokenizer=tiny_tok.model_path, tokenizer_sha256=tiny_tok.sha256())
    poems = [JING_YE_SI, "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。", "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"]
    write_jsonl(d / "q.jsonl", [{"kind": "poem", "question": f"请写一首题为《诗{i}》的诗。", "reference": p}
                                for i, p in enumerate(poems * 3)])
    flags = [f"--init_ckpt={d / 'sft.pt'}", f"--train_prompts={d / 'q.jsonl'}", f"--val_prompts={d / 'q.jsonl'}",
             "--reward=char:月", "--max_new_tokens=8", "--group_size=8", "--prompts_per_iter=2", "--minibatch_size=16",
             "--learning_rate=1e-2", "--min_lr=1e-2", "--warmup_iters=0", "--beta=0.0", "--dtype=float32",
             "--num_threads=1"]
    return d, flags


def save_tiny_ckpt(tok, path):
    """A checkpoint of a tiny model for tok's vocabulary (a context of 16 tokens) at path."""
    model = tiny_model(0, dim=32, vocab_size=tok.vocab_size, max_seq_len=16)
    save_merged(str(path), model, iter_num=0, config={}, tokenizer=tok.model_path, tokenizer_sha256=tok.sha256())


# ---- serve.py: a tiny checkpoint, the server on a loopback port, raw HTTP ------------------------------------

def tiny_checkpoint(d, ctx=64, dim=48, n_layers=2, seed=0, endless=False, zero_keys=False):
    """(checkpoint path, model, tokenizer) of a random model with weights N(0, 0.3) (greedy tokens far from ties).
    endless: the stop tokens' (tied) embeddings are zero, so their logit is 0 where the best of 400 random logits is
    far above: greedy answers run to max_tokens (a long request to leave or to cut short). zero_keys: every query
    weighs every earlier token the same, so the answer depends on the whole prompt (a crop shows)."""
    tok = tiny_tokenizer(d)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=ctx, multiple_of=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
        if zero_keys:
            for layer in model.layers:
                layer.attention.wk.weight.zero_()
        if endless:
            model.tok_embeddings.weight[[tok.eos_id, tok.end_id]] = 0
    save_merged(str(d / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=tok.model_path,
                tokenizer_sha256=tok.sha256())
    return d / "ckpt.pt", model, tok


def start_server(ckpt, *flags, output=subprocess.DEVNULL, cwd=ROOT):
    """serve.py on a free loopback port, running once /health answers: (process, port). cwd: its working directory."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt_path={ckpt}", f"--port={port}",
                             "--dtype=float32", *flags], cwd=cwd, env=ENV, stdout=output, stderr=subprocess.STDOUT,
                            text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}" + (f":\n{proc.stdout.read()}" if proc.stdout
                                                                          else ""))
        try:
            if raw(port, "GET", "/health", timeout=1)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve.py did not answer /health in 60 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("serve.py did not exit within 15 s of SIGTERM")


def raw(port, method, path, body=None, headers=None, key=None, timeout=30):
    """(status, the JSON answer or None, headers as a dict) of one request; body: bytes, str or a JSON value;
    headers: added to Content-Type application/json (a None value removes one)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    data = body if isinstance(body, bytes) or body is None else body if isinstance(body, str) else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read()
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text.decode("utf-8", "replace")
        return r.status, answer, {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


# ---- tokenizers of every kind, made by the tests (tests/tokenizer_files.py) or published (../shared, skipped where absent)


@pytest.fixture(scope="session")
def dummy_prefix_model(tmp_path_factory):
    return train_dummy_prefix(str(tmp_path_factory.mktemp("sp") / "dummy"))


@pytest.fixture(scope="session")
def tiny_json(tmp_path_factory):
    return train_byte_level(str(tmp_path_factory.mktemp("hf") / "tiny"))


@pytest.fixture(scope="session")
def qwen2_json(tiny_json, tmp_path_factory):
    pytest.importorskip("transformers")
    return qwen2_pipeline(tiny_json, str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="session")
def tokenizer_file(dummy_prefix_model, tiny_json, qwen2_json, tiny_tok):
    """name -> the path of a tokenizer of that kind (published ones skip where ../shared lacks them)."""
    made = {"ours": tiny_tok.model_path, "dummy_prefix": dummy_prefix_model, "byte_level": tiny_json,
            "qwen2": qwen2_json}
    return lambda name: made.get(name) or published(name, "tokenizer.json" if name == "minimind" else "tokenizer.model")


def pytest_collection_modifyitems(items):
    """The slow subprocess runs first, then the other script tests, then unit tests: pytest-xdist's workers then end
    on short tests together, instead of one waiting for the other's last long run."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "scripts" not in item.nodeid))
