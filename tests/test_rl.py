"""The RL stage: rl.py's losses against hand-computed values, reply log-probs against the plain forward, the
poetry rewards on hand-written poems (malformed ones too), the rewards by name, and grpo.py: it optimises a toy
reward, never moves its reference, and resumes to the weights of a straight run."""
import json
import math
import re

from conftest import TORCHRUN_2, run_script
import pytest
from sft_fixtures import tiny_tokenizer
import torch

from babyllama import checkpoint as ck, optimize, rl_run
from babyllama.dist import Run
from babyllama.models import load_model, save_merged
from babyllama.poetry_rewards import (build_tone_table, clauses_of, exact_form, form_score, load_tone_table,
                                      make_request, parse_request, poetry_reward, repeat_score, title_score,
                                      tone_score)
from babyllama.precision import amp_setup
from babyllama.reward_model import RewardModel, bt_loss, load_reward_model, score_conversations
from babyllama.rewards import REWARDS, check_reward, reward_function
from babyllama.rl import gae, group_advantages, k3_kl, minibatch_policy_loss, policy_loss, reply_logps, value_loss
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# ---- rl.py against hand-computed values ---------------------------------------------------------------------

def test_group_advantages_are_zero_mean_per_group_and_zero_for_equal_rewards():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    std = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 4)  # population std of 1, 2, 3, 4
    assert a[:4].tolist() == pytest.approx([-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4),
                                            1.5 / (std + 1e-4)])
    assert a[4:].tolist() == [0, 0, 0, 0] and abs(float(a[:4].sum())) < 1e-6
    assert group_advantages(r, 4, normalize=False)[:4].tolist() == [-1.5, -0.5, 0.5, 1.5]  # Dr. GRPO


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # q = log(0.25 / 0.5) = -log 2: e^q - q - 1 = 0.5 + log 2 - 1; equal distributions give 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


def test_clipped_objective_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))  # ratios 1.5, 0.5, 0.5 (old log-probs 0)
    mask = torch.ones(1, 3)
    # token 1: A = 2, min(1.5*2, 1.2*2) = 2.4; token 2: A = 2, min(0.5*2, 0.8*2) = 1.0; token 3: A = -1,
    # min(-0.5, -0.8) = -0.8. Loss = -(2.4 + 1.0 - 0.8) = -2.6; the first two ratios lie outside [0.8, 1.2]
    adv = torch.tensor([[2.0, 2.0, -1.0]])
    loss, st = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-2.6) and st["clipped"] == 3 and st["tokens"] == 3
    # sequence aggregation: the reply's token mean; a masked token counts nowhere
    loss, _ = policy_loss(logp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip_eps=0.2, aggregation="sequence")
    assert float(loss) == pytest.approx(-(2.4 + 1.0) / 2)
    # the KL penalty adds beta * k3 per token
    ref = logp - 0.1
    loss, st = policy_loss(logp, old, adv, mask, 0.2, beta=0.5, ref_logp=ref)
    assert float(loss) == pytest.approx(-2.6 + 0.5 * 3 * (math.exp(-0.1) + 0.1 - 1))


def test_gae_and_value_loss_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th step is padding: its value must not leak in
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # delta2 = 1 - 0.7 = 0.3; A2 = 0.3; delta1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.9 * 0.3 = 0.37;
    # delta0 = 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.9 * 0.37 = 0.433
    assert adv[0].tolist() == pytest.approx([0.433, 0.37, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0, 0.0])
    # value loss: V = 1.0 from old 0.5 with returns 0.2: max((0.8)^2, (0.7 - 0.2)^2) / 2 = 0.32
    assert float(value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.2]]),
                            torch.tensor([[1.0]]), clip=0.2)) == pytest.approx(0.32)


def test_reply_logps_are_the_forward_pass_log_probs_of_the_reply_tokens():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32, multiple_of=16)).eval()
    prompts, replies = [[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]]
    torch.set_grad_enabled(False)
    try:
        check_reply_logps(m, prompts, replies)
    finally:
        torch.set_grad_enabled(True)


def check_reply_logps(m, prompts, replies):
    logp, mask, ent = reply_logps(m, prompts, replies, 0, "cpu", with_entropy=True)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for b, (p, r) in enumerate(zip(prompts, replies)):
        full = m(torch.tensor([p + r]))[0][0].log_softmax(-1)
        want = [full[len(p) - 1 + i, t].item() for i, t in enumerate(r)]
        assert logp[b, :len(r)].tolist() == pytest.approx(want, abs=1e-5)
        assert float(ent[b, 0]) == pytest.approx(float(-(full[len(p) - 1].exp() * full[len(p) - 1]).sum()), abs=1e-5)


# ---- the poetry rewards -------------------------------------------------------------------------------------------

JING_YE_SI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"


def test_poetry_rewards_on_hand_written_poems():
    ask = make_request("静夜思", 5, 4)
    assert ask == "写一首五言绝句，题为《静夜思》" and parse_request(ask) == {"chars": 5, "clauses": 4, "title": "静夜思"}
    spec = parse_request(ask)
    assert form_score(JING_YE_SI, spec) == 1.0 and exact_form(ask, JING_YE_SI)
    assert form_score("静夜思\n" + JING_YE_SI, spec) == 1.0 and title_score("静夜思\n" + JING_YE_SI, spec) == 1.0
    assert title_score(JING_YE_SI, spec) == 0.0
    # a 七言 request for a 五言 poem: count right, lengths wrong, marks right -> (1 + 0 + 1) / 3
    assert form_score(JING_YE_SI, parse_request(make_request("静夜思", 7, 4))) == pytest.approx(2 / 3)
    # a 律诗 request: 4 of 8 clauses, all of the right length among them, marks right -> (0 + 4/8 + 4/8) / 3
    assert form_score(JING_YE_SI, parse_request(make_request("静夜思", 5, 8))) == pytest.approx(1 / 3)
    # malformed: no punctuation at all, one clause of 10 characters -> lengths 0, marks 0, count 0
    assert form_score("床前明月光疑是地上霜", spec) == 0.0 and form_score("", spec) == 0.0
    # wrong marks: every clause ends with "，" -> the 2nd and 4th marks are wrong: (1 + 1 + 2/4) / 3
    assert form_score("床前明月光，疑是地上霜，举头望明月，低头思故乡，", spec) == pytest.approx(2.5 / 3)
    repeated = "床前明月光，疑是地上霜。\n床前明月光，疑是地上霜。"
    assert repeat_score(repeated) == 0.5 and repeat_score(JING_YE_SI) == 1.0
    assert poetry_reward(ask, repeated) == pytest.approx(1.0 + 0.5 * 0.5)
    assert poetry_reward("写一首诗", JING_YE_SI) == 0.0  # no form asked for: nothing to verify
    assert clauses_of("a，b。c") == [("a", "，"), ("b", "。"), ("c", "")]


# ---- grpo.py ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tok = tiny_tokenizer(d)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=48,
                              multiple_of=16))
    save_merged(str(d / "sft.pt"), m, iter_num=0, config={}, tokenizer=tok.model_path, tokenizer_sha256=tok.sha256())
    poems = [JING_YE_SI, "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。", "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"]
    with open(d / "q.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(poems * 3):
            f.write(json.dumps({"kind": "poem", "question": f"请写一首题为《诗{i}》的诗。", "reference": p},
                               ensure_ascii=False) + "\n")
    args = [f"--init_ckpt={d / 'sft.pt'}", f"--train_prompts={d / 'q.jsonl'}", f"--val_prompts={d / 'q.jsonl'}",
            "--reward=char:月", "--max_new_tokens=8", "--group_size=8", "--prompts_per_iter=2", "--minibatch_size=16",
            "--learning_rate=1e-2", "--min_lr=1e-2", "--warmup_iters=0", "--beta=0.0", "--dtype=float32",
            "--num_threads=1"]
    return d, args


def test_grpo_teaches_a_tiny_model_the_rewarded_token_and_resumes_exactly(tiny_run):
    d, args = tiny_run
    run_script("grpo.py", *args, f"--out_dir={d / 'learn'}", "--max_iters=20", "--eval_interval=20")
    s = json.loads((d / "learn" / "summary.json").read_text())
    before, after = s["held_out"]["before"]["reward"], s["held_out"]["after"]["reward"]
    assert after - before >= 0.3  # the share of "月" in the greedy replies
    start = torch.load(d / "sft.pt", weights_only=True)["model"]
    end = torch.load(d / "learn" / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the policy did move
    # the same run stopped at iteration 10 and resumed: the weights of the straight run (evaluations, which
    # differ between the two, draw no random numbers)
    run_script("grpo.py", *args, f"--out_dir={d / 'halves'}", "--max_iters=10", "--eval_interval=10")
    run_script("grpo.py", *args, f"--out_dir={d / 'halves'}", "--max_iters=20", "--eval_interval=10",
               "--init_from=resume")
    halves = torch.load(d / "halves" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(end[k], halves[k]) for k in end)


@pytest.mark.slow
def test_grpo_and_ppo_run_on_two_processes(tiny_run, tmp_path):
    # one micro-step per process: setup_run is told the world size (it once refused any torchrun launch)
    d, args = tiny_run
    keep = [a for a in args if not a.startswith(("--group_size", "--prompts_per_iter", "--minibatch_size"))]
    run_script("grpo.py", *keep, "--group_size=4", "--prompts_per_iter=1", "--minibatch_size=4", "--max_iters=2",
               "--eval_interval=2", f"--out_dir={tmp_path / 'grpo'}", launcher=TORCHRUN_2)
    run_script("ppo.py", *[a for a in keep if not a.startswith("--beta")],
               f"--value_ckpt={value_checkpoint(d, tmp_path / 'v.pt')}", "--prompts_per_iter=2", "--minibatch_size=2",
               "--max_iters=2", "--eval_interval=2", f"--out_dir={tmp_path / 'ppo'}", launcher=TORCHRUN_2)
    for name in ("grpo", "ppo"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["iter"] == 2


def value_checkpoint(d, path):
    """A value model for ppo.py: a reward model (a fresh head) on the tiny SFT model at d."""
    body, c = load_model(str(d / "sft.pt"))
    torch.manual_seed(0)
    ck.save(str(path), {"model": RewardModel(body).state_dict(), "model_args": c["model_args"]})
    return path


def test_the_reference_keeps_the_starting_weights_while_the_policy_trains(tiny_run):
    # the RL scripts' start and optimizer steps on the clipped loss with the KL term: the policy moves, pi_ref
    # (a frozen copy, no storage shared with the policy, outside the optimizer) stays the starting checkpoint's
    d, _ = tiny_run
    autocast, scaler = amp_setup("cpu", "float32")
    run = Run(autocast=autocast, scaler=scaler)
    raw_model, _, optim, model, ref, _ = rl_run.policy_and_reference(str(d / "sft.pt"), None, run, 0, 0.0, 1e-2,
                                                                     (0.9, 0.95))
    prompts, replies = [[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]]
    with torch.no_grad():
        old, _, _ = reply_logps(raw_model, prompts, replies, 0, "cpu")
        ref_logp, _, _ = reply_logps(ref, prompts, replies, 0, "cpu")
    for _ in range(3):
        loss, _ = minibatch_policy_loss(model, prompts, replies, [0, 1], old, ref_logp, torch.tensor([1.0, -1.0]), 0,
                                        "cpu", beta=0.5)
        loss.backward()
        optimize.optimizer_step(optim, scaler, 1.0)
    start = ck.load(str(d / "sft.pt"))["model"]
    assert all(torch.equal(start[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in raw_model.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters())


def test_rewards_come_from_one_registry():
    assert reward_function("char:月")(["q", "q"], ["明月", "x"]) == [0.5, 0.0]
    ask, poem = make_request("静夜思", 5, 4), JING_YE_SI
    assert reward_function("poetry", weights=(1.0, 0.5, 0.0, 0.0), tone_table="", poetry="")([ask], [poem]) == [1.5]
    for bad in ("char:", "char:ab", "Poetry", "char:X:Y", "model:x"):
        with pytest.raises(SystemExit, match="reward must be one of") as e:
            check_reward(bad)
        assert all(name in str(e.value) for name in REWARDS)  # the message lists every reward


def test_a_missing_tone_table_is_built_from_the_corpus_once(tmp_path):
    (tmp_path / "dist" / "strains" / "json").mkdir(parents=True)
    (tmp_path / "dist" / "quantangshi").mkdir(parents=True)
    (tmp_path / "dist" / "strains" / "json" / "a.json").write_text(json.dumps([{"id": "0", "strains": ["平仄"]}],
                                                                               ensure_ascii=False))
    (tmp_path / "dist" / "quantangshi" / "poet.tang.0.json").write_text(
        json.dumps([{"id": "0", "paragraphs": ["甲乙"]}], ensure_ascii=False))
    table = tmp_path / "out" / "tones.json"
    assert load_tone_table(str(table), str(tmp_path)) == {"甲": "平", "乙": "仄"} == json.loads(table.read_text())
    assert load_tone_table(str(table), str(tmp_path / "gone")) == {"甲": "平", "乙": "仄"}  # read, not rebuilt
    with pytest.raises(ValueError, match="no tone patterns"):
        load_tone_table(str(tmp_path / "other.json"), str(tmp_path / "gone"))


def test_bench_times_a_group_as_one_batch_against_one_reply_at_a_time():
    out = run_script("bench.py", "--rollout=True", "--skip_train=True", "--skip_gen=True", "--dim=32", "--n_layers=1",
                     "--n_heads=2", "--vocab_size=64", "--max_seq_len=32", "--rollout_group=2",
                     "--rollout_new_tokens=4", "--rollout_runs=1", "--num_threads=1", "--compile=False",
                     "--dtype=float32").stdout
    assert re.search(r"rollout: a group of 2 as one batch [\d,]+ tokens/s, one at a time [\d,]+ tokens/s", out)


# ---- the reward model ---------------------------------------------------------------------------------------------

def test_bradley_terry_loss_and_accuracy_on_a_hand_made_batch():
    rc, rr = torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1, -1, 0
    assert bt_loss(rc, rr).tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)),
                                                      math.log(2)])
    assert bt_loss(rc, rr, margin=0.5).tolist() == pytest.approx([math.log(1 + math.exp(-0.5)),
                                                                  math.log(1 + math.exp(1.5)), math.log(1 + math.exp(0.5))])
    assert (rc > rr).float().mean().item() == pytest.approx(1 / 3)  # a tie is not a win


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32,
                                           multiple_of=16))).eval()
    short, long = [1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15]
    with torch.no_grad():
        alone = rm([short], "cpu")
        padded = rm([short, long], "cpu")
        h = rm.body._forward_positions(torch.tensor([short]), torch.arange(4)[None], None, head=False)
        by_hand = rm.head(h[0, -1]).item()
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5) == pytest.approx(by_hand, abs=1e-5)
    assert padded[1].item() != pytest.approx(padded[0].item(), abs=1e-3)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reward_model_script_learns_held_out_preferences(tiny_run, tmp_path, lora_rank):
    d, _ = tiny_run
    rows = []
    for i in range(40):  # chosen replies say "明月", rejected ones "黄河": a pattern a tiny model can learn
        rows.append({"conversations": [{"from": "human", "value": f"请写一首题为《诗{i}》的诗。"}],
                     "chosen": {"from": "gpt", "value": "床前明月光" if i % 2 else "举头望明月"},
                     "rejected": {"from": "gpt", "value": "黄河入海流" if i % 2 else "白日依山尽"}})
    for name, part in (("train", rows[:32]), ("val", rows[32:])):
        (tmp_path / f"{name}.json").write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    run_script("reward_model.py", f"--init_ckpt={d / 'sft.pt'}", f"--train_data={tmp_path / 'train.json'}",
               f"--val_data={tmp_path / 'val.json'}", f"--out_dir={tmp_path / 'rm'}", "--max_iters=30",
               "--eval_interval=30", "--batch_size=8", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=0",
               "--dtype=float32", "--num_threads=1", f"--lora_rank={lora_rank}")
    s = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert s["held_out"]["after"]["accuracy"] == 1.0 and s["held_out"]["after"]["margin"] > 1.0
    rm, ckpt = load_reward_model(str(tmp_path / "rm" / "ckpt.pt"))
    tok = Tokenizer(ckpt["tokenizer"])
    good, bad = score_conversations(rm, tok, [
        {"messages": [{"role": "user", "content": "请写一首题为《春》的诗。"}, {"role": "assistant", "content": m}]}
        for m in ("床前明月光", "黄河入海流")], "cpu")
    assert good > bad


def test_ppo_teaches_a_tiny_model_the_rewarded_token(tiny_run, tmp_path):
    d, args = tiny_run
    keep = [a for a in args if not a.startswith(("--group_size", "--prompts_per_iter", "--minibatch_size", "--beta"))]
    run_script("ppo.py", *keep, f"--value_ckpt={value_checkpoint(d, tmp_path / 'value.pt')}",
               f"--out_dir={tmp_path / 'ppo'}",
               "--prompts_per_iter=16", "--minibatch_size=8", "--max_iters=20", "--eval_interval=20",
               "--value_learning_rate=1e-2", "--kl_coef=0.0")
    s = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert s["held_out"]["after"]["reward"] - s["held_out"]["before"]["reward"] >= 0.3
    saved = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)
    assert any(k.startswith("head.") for k in saved["value_model"])  # the value model is saved for resume


def test_tone_rules_on_a_hand_made_table():
    ask = parse_request(make_request("题", 5, 4))
    table = {"一": "平", "二": "仄", "三": "平", "四": "仄"}
    # clause 1 "甲一乙二丙": 2nd 一 平, 4th 二 仄: differ (pass); clause 2 "丁二戊二己": 二, 二 same (fail);
    # couplet: 一 vs 二 differ (pass). Clauses 3-4 hold no known character: no check. 2 of 3 pass
    reply = "甲一乙二丙，丁二戊二己。\n庚辛壬癸子，丑寅卯辰巳。"
    assert tone_score(reply, ask, table) == pytest.approx(2 / 3)
    assert tone_score("庚辛壬癸子，丑寅卯辰巳。", ask, table) == 0.0  # nothing checkable
    assert tone_score("甲一乙二丙丁戊，己。", ask, table) == 0.0  # a clause of the wrong length is not checked
    seven = parse_request(make_request("题", 7, 4))
    # 七言: 2nd/4th and 4th/6th: "甲一乙二丙三丁": 一 平 / 二 仄 pass, 二 仄 / 三 平 pass -> 2 of 2
    assert tone_score("甲一乙二丙三丁，", seven, table) == 1.0


def test_tone_table_keeps_characters_read_one_way(tmp_path):
    (tmp_path / "dist" / "strains" / "json").mkdir(parents=True)
    (tmp_path / "dist" / "quantangshi").mkdir(parents=True)
    poems, strains = [], []
    for i in range(10):  # 甲 is 平 9 times of 10, 乙 平 5 of 10, 丙 always 仄; 丁's line has a pattern of another length
        poems.append({"id": str(i), "paragraphs": ["甲乙丙", "丁"]})
        strains.append({"id": str(i), "strains": ["平" + ("平" if i % 2 else "仄") + "仄" if i else "仄平仄",
                                                  "平平"]})
    (tmp_path / "dist" / "strains" / "json" / "a.json").write_text(json.dumps(strains, ensure_ascii=False))
    (tmp_path / "dist" / "quantangshi" / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False))
    assert build_tone_table(str(tmp_path)) == {"甲": "平", "丙": "仄"}
