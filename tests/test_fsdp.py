"""parallel='fsdp' (FSDP2) and what comes with it: sharded DCP checkpoints that resume on another number of
processes, activation checkpointing, Muon. The training runs are the scripts as users run them (torchrun, gloo
on the CPU); the references are one process with the same total accumulation, computed by the same scripts in
their plain path, and for Muon a Newton-Schulz iteration written here from the paper's description."""
import json
import math
import os

from conftest import TORCHRUN_2, run_script, write_motif_bins
import numpy as np
import pytest
from sft_fixtures import write_chat_files
import torch

from babyllama import checkpoint as ck, dist, models, sharded
from babyllama.optimize import configure_optimizers
from model import ModelArgs, Transformer

TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=32", "--batch_size=2",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--num_threads=1",
        "--dtype=float32", "--device=cpu", "--gradient_accumulation_steps=4", "--eval_interval=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_motif_bins(tmp_path_factory.mktemp("bins"), 256, 200, n_motifs=30, max_len=20, n_draws=2000,
                            n_val=4000)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_files(tmp_path_factory.mktemp("chat"))


def pretrain(data, out, *extra, launcher=None):
    run_script("pretrain.py", *TINY, f"--train_data={data / 'train.bin'}", f"--val_data={data / 'val.bin'}",
               f"--out_dir={out}", *extra, launcher=launcher)


def train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_run(ref_dir, ref_ckpt, other_dir, other_ckpt, tol, weight_tol=None):
    """Same training losses at every iteration to tol, and the same final weights to weight_tol (default tol)."""
    a, b = train_losses(ref_dir), train_losses(other_dir)
    assert sorted(a) == sorted(b) and len(a) >= 2
    for it in a:
        assert abs(a[it] - b[it]) <= tol, (it, a[it], b[it])
    assert a[max(a)] < a[0]  # it trained: equal weights are not the initial ones
    w1, w2 = ck.load(str(ref_dir / ref_ckpt))["model"], ck.load(str(other_dir / other_ckpt))["model"]
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=weight_tol or tol, rtol=0), k


# ---- the scripts under torchrun -----------------------------------------------------------------------------

def test_fsdp_equals_one_process_and_resumes_from_two_processes_on_one_and_back(data, tmp_path):
    # untied embeddings, 6 iterations of 4 micro-steps: one process with the plain model, against FSDP on 2
    # processes (0-2), then resumed on 1 (2-4), then on 2 again (4-6)
    untied = ["--tie_embeddings=False", "--lr_decay_iters=6"]
    pretrain(data, tmp_path / "straight", *untied, "--max_iters=6")
    for n_iters, launcher in ((2, TORCHRUN_2), (4, None), (6, TORCHRUN_2)):
        resume = ["--init_from=resume"] if n_iters > 2 else []
        pretrain(data, tmp_path / "fsdp", *untied, f"--max_iters={n_iters}", "--parallel=fsdp", *resume,
                 launcher=launcher)
        assert os.path.islink(tmp_path / "fsdp" / "ckpt.dcp")
    assert_same_run(tmp_path / "straight", "ckpt.pt", tmp_path / "fsdp", "ckpt.dcp", 1e-5)
    # only the folders the links name are kept; the converter (python checkpoint.py X.dcp Y.pt: these two
    # calls) writes what eval.py and export read
    assert sorted(os.listdir(tmp_path / "fsdp" / "dcp")) == ["iter_00000006"]
    ck.save(str(tmp_path / "model.pt"), sharded.consolidate(str(tmp_path / "fsdp" / "ckpt.dcp")))
    one = torch.load(tmp_path / "model.pt", weights_only=True)
    assert one["iter_num"] == 6 and one["model_args"]["tie_embeddings"] is False
    model, _ = models.load_model(str(tmp_path / "model.pt"))
    straight = ck.load(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, straight[k], atol=1e-5, rtol=0), k


def finetune(script, chat, out, *extra, launcher=None):
    run_script(script, f"--init_ckpt={chat / 'base.pt'}", f"--out_dir={out}", "--val_data=", "--max_iters=3",
               "--num_threads=1", "--dtype=float32", "--device=cpu", "--warmup_iters=0", "--learning_rate=3e-3",
               "--batch_size=1", "--gradient_accumulation_steps=4", "--eval_interval=100", *extra, launcher=launcher)


def test_fsdp_lora_sft_on_two_processes_equals_one_process_with_tied_embeddings(chat, tmp_path):
    lora = [f"--train_data={chat / 'train.jsonl'}", "--lora_rank=4", "--pack=False"]
    finetune("sft.py", chat, tmp_path / "one", *lora)
    finetune("sft.py", chat, tmp_path / "fsdp", *lora, "--parallel=fsdp", launcher=TORCHRUN_2)
    # only the adapters were trained and saved; merged.pt (gathered from the shards) is base + adapters
    assert all("lora_" in k for k in ck.load(str(tmp_path / "fsdp" / "ckpt.dcp"))["lora"])
    assert_same_run(tmp_path / "one", "merged.pt", tmp_path / "fsdp", "merged.pt", 1e-5)


def test_hsdp_dpo_with_muon_on_two_processes_equals_one_process(chat, tmp_path):
    # replicas=2: a (2 x 1) mesh, each process a whole shard group, the two replicated (HSDP's cross-node half)
    dpo = [f"--train_data={chat / 'pairs.jsonl'}", "--n_samples=0", "--sft_weight=0.5", "--optimizer=muon"]
    finetune("dpo.py", chat, tmp_path / "one", *dpo)
    finetune("dpo.py", chat, tmp_path / "fsdp", *dpo, "--parallel=fsdp", "--replicas=2", launcher=TORCHRUN_2)
    # the losses agree to float rounding. The weights less: the runs' gradients differ in the last bits (another
    # summation order), and Newton-Schulz, run in bf16, lifts every singular direction of the momentum to ~1,
    # the tiny ones made of rounding noise too, so an entry may differ by a fraction of one step's update
    # (~5e-3 here: lr 3e-3 x 0.2 x sqrt(176)); up to 2.8e-4 after 6 steps in a pretraining run
    assert_same_run(tmp_path / "one", "ckpt.pt", tmp_path / "fsdp", "ckpt.dcp", 1e-5, weight_tol=1e-3)


# ---- in one process -----------------------------------------------------------------------------------------

def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    run, link = dist.Run(), str(tmp_path / "ckpt.dcp")
    sharded.save_sharded(link, model, opt, {"iter_num": 2, "model_args": {}}, run)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = dcp.save

    def killed(state, checkpoint_id):  # the shards are written, then the process dies before the link moves
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt
    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded.save_sharded(link, model, opt, {"iter_num": 4, "model_args": {}}, run)
    back = ck.load(link)
    assert back["iter_num"] == 2
    for k, v in saved.items():
        assert torch.equal(back["model"][k], v), k
    monkeypatch.setattr(dcp, "save", real_save)
    sharded.save_sharded(link, model, opt, {"iter_num": 4, "model_args": {}}, run)  # the next save tidies up
    assert ck.load(link)["iter_num"] == 4 and os.listdir(tmp_path / "dcp") == ["iter_00000004"]


def test_muon_and_adamw_state_come_back_from_a_sharded_checkpoint(tmp_path):
    def model_and_muon():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8))
        return model, configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), "cpu", optimizer="muon")
    model, opt = model_and_muon()
    x = torch.randint(0, 32, (2, 8))
    model(x, x, return_logits=False)[1].backward()
    opt.step()
    sharded.save_sharded(str(tmp_path / "ckpt.dcp"), model, opt, {"iter_num": 1, "model_args": {}}, dist.Run())
    fresh, fresh_opt = model_and_muon()
    sharded.load_sharded(str(tmp_path / "ckpt.dcp"), fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for o, f in zip(opt.optimizers, fresh_opt.optimizers):  # AdamW's moments and step, Muon's momentum
        for p, q in zip([p for g in o.param_groups for p in g["params"]],
                        [q for g in f.param_groups for q in g["params"]]):
            assert o.state[p].keys() == f.state[q].keys() and o.state[p]
            for k in o.state[p]:
                assert torch.equal(torch.as_tensor(o.state[p][k]), torch.as_tensor(f.state[q][k])), k


def test_resuming_a_sharded_run_without_parallel_fsdp_names_the_setting(tmp_path):
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    sharded.save_sharded(str(tmp_path / "ckpt.dcp"), model, opt, {"iter_num": 2, "model_args": {}}, dist.Run())
    with pytest.raises(SystemExit, match="--parallel=fsdp"):
        ck.resume("resume", "scratch", ck.checkpoint_path(str(tmp_path), "ddp"), "cpu", {}, set(), ())


def saved_bytes(model, x, y):
    """Loss, gradients, and the bytes autograd keeps for the backward pass of one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y, return_logits=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, total[0]


def test_activation_checkpointing_keeps_less_and_leaves_the_gradients_unchanged():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, max_seq_len=16, dropout=0.1))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    loss, grads, kept = saved_bytes(model, x, y)
    for layer in model.layers:
        layer.checkpointing = True
    loss2, grads2, kept2 = saved_bytes(model, x, y)
    assert loss2 == loss
    for n in grads:  # dropout is on: the recomputation must replay the same masks
        assert torch.allclose(grads[n], grads2[n], atol=1e-7, rtol=0), n
    assert kept2 < kept / 2, (kept, kept2)


def newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """The quintic Newton-Schulz iteration of Jordan et al. (2024), in float64: X <- aX + (bA + cA^2)X with
    A = X X^T, from X = G / ||G||_F, on the wide orientation of G."""
    x = g / np.linalg.norm(g)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def test_muon_update_is_the_orthogonalised_nesterov_momentum_scaled_to_adamw():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=4))
    lr, wd, mu = 0.05, 0.1, 0.95
    opt = configure_optimizers(model, wd, lr, (0.9, 0.95), "cpu", optimizer="muon")
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {f"layers.0.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv",
                                                        "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                        "feed_forward.w3")}
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == set(names.values()) - in_muon
    rng = np.random.default_rng(0)
    # momentum as the paper writes it: buf = mu buf + g, update = g + mu buf (Nesterov); torch keeps an
    # average instead, which only rescales the update, and the orthogonalisation removes the scale
    for name in ("layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"):  # square, and tall (w1)
        p = dict(model.named_parameters())[name]
        buf, scale = np.zeros(p.shape), lr * 0.2 * math.sqrt(max(p.shape))  # Liu et al. 2025's RMS match
        for step in range(2):
            w = p.detach().double().numpy().copy()
            g = rng.standard_normal(p.shape)
            for q in model.parameters():
                q.grad = torch.zeros_like(q)
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            buf = mu * buf + g
            o = newton_schulz(g + mu * buf)
            expected = w * (1 - lr * wd) - scale * o
            # NS runs in bf16 in torch: a relative error of ~1% in the step; an unorthogonalised step would be
            # off by far more (checked below)
            err = np.abs(p.detach().double().numpy() - expected).max() / (scale * np.abs(o).max())
            assert err < 0.03, (name, step, err)
        plain = (g + mu * buf) / np.linalg.norm(g + mu * buf)
        assert np.abs(newton_schulz(g + mu * buf) - plain).max() > 0.2  # orthogonalising changes the update


# ---- the memory estimator against a measured peak ----------------------------------------------------------

@pytest.mark.parametrize("shape", [
    ["--dim=128", "--n_layers=4", "--n_heads=4", "--vocab_size=2048", "--batch_size=32"],
    ["--dim=192", "--n_layers=3", "--n_heads=4", "--n_kv_heads=2", "--tie_embeddings=False", "--vocab_size=4096",
     "--batch_size=32", "--activation_checkpointing=True"]], ids=["tied", "untied-gqa-checkpointed"])
def test_memory_estimate_is_within_15_percent_of_the_measured_peak(shape):
    # the peak resident set's rise over two training steps (the second with AdamW's state) against
    # model.training_memory for the same set-up, as bench.py prints them
    out = run_script("bench.py", *shape, "--max_seq_len=128", "--measure=True", "--skip_gen=True", "--steps=1",
                     "--warmup_steps=1", "--compile=False", "--dtype=float32", "--num_threads=1").stdout
    line = next(x for x in out.splitlines() if x.startswith("memory: measured"))
    ratio = float(line.rsplit("=", 1)[1])
    assert 0.85 <= ratio <= 1.15, line
