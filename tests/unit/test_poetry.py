"""babyllama/poetry.py: the demo preference set built from poetry documents (held-out poems in no training pair,
each corruption of a poem). The well-formed-poem rule: test_poem_form.py."""
import random

from conftest import QUATRAINS, write_poems

from babyllama.poem_form import poem_clauses
from babyllama.poetry import build_poetry_pairs, corrupt


def test_demo_pairs_from_poetry_docs(tmp_path):
    path = write_poems(tmp_path / "poet.tang.0.json")
    train, val, stats = build_poetry_pairs([str(path)], n_poems=10, n_val=1, seed=0)
    assert stats["poems used"] == 4 and len(val) == 3 and len(train) == 9
    val_titles = {p["prompt"][0]["content"] for p in val}
    assert not val_titles & {p["prompt"][0]["content"] for p in train}  # held-out poems are in no train pair
    for p in train + val:
        assert p["chosen"] != p["rejected"]
        if p["kind"] == "author":
            assert p["rejected"].startswith(p["chosen"].split("的作者是")[0])
    cl = poem_clauses(QUATRAINS[0][2])
    assert len(cl) == 4 and corrupt(cl, "truncated", random.Random(0)) == "床前明月光，疑是地上霜。"
    assert corrupt(cl, "repeated", random.Random(0)) == "床前明月光，疑是地上霜。\n床前明月光，疑是地上霜。"
    shuffled = corrupt(cl, "shuffled", random.Random(0))
    assert sorted(shuffled.replace("\n", "").replace("，", "。").split("。")) == sorted(
        QUATRAINS[0][2].replace("\n", "").replace("，", "。").split("。"))  # the same clauses ...
    assert shuffled != QUATRAINS[0][2]  # ... in another order
