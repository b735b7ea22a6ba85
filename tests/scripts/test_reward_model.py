"""reward_model.py as users run it: full and LoRA runs learn held-out preferences (every pair ranked right, by a
margin), and the saved model, loaded back, scores a conversation of the rewarded kind higher."""
import json

from conftest import run_script
import pytest

from babyllama.reward_model import load_reward_model, score_conversations
from tokenizer import Tokenizer


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reward_model_script_learns_held_out_preferences(rl_files, tmp_path, lora_rank):
    d, _ = rl_files
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

