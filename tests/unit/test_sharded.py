"""babyllama/sharded.py in one process: a save killed half-way leaves the previous DCP checkpoint loadable (and the
next save tidies up), AdamW's and Muon's state come back from a sharded checkpoint, and resuming one without
--parallel=fsdp names the setting. The FSDP runs themselves: tests/scripts/test_pretrain.py, test_sft.py,
test_dpo.py."""
import os

from conftest import tiny_model
import pytest
import torch
import torch.distributed.checkpoint as dcp

from babyllama import checkpoint as ck, dist, sharded
from babyllama.optimize import configure_optimizers

SHARDED = dict(dim=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model(0, **SHARDED)
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
        model = tiny_model(0, **SHARDED)
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
    model = tiny_model(0, **SHARDED)
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    sharded.save_sharded(str(tmp_path / "ckpt.dcp"), model, opt, {"iter_num": 2, "model_args": {}}, dist.Run())
    with pytest.raises(SystemExit, match="--parallel=fsdp"):
        ck.resume("resume", "scratch", ck.checkpoint_path(str(tmp_path), "ddp"), "cpu", {}, set(), ())
