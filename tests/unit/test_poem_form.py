"""babyllama/poem_form.py: the one well-formed-poem rule (regular clauses of five or seven characters, four or
eight of them) on hand-written poems, and the clauses it reads."""
from babyllama.poem_form import poem_clauses, well_formed_poem


def test_one_rule_accepts_regular_poems_and_rejects_the_rest():
    quatrain = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    regulated = ("国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n"
                 "烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。")
    for text in (quatrain, regulated, "朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山！",
                 "床前明月光，疑是地上霜？\n\n举头望明月；低头思故乡。",  # a blank line, ？ and ； are fine
                 quatrain + "\n。"):  # a stray mark on a line of its own: the clauses are still regular
        assert well_formed_poem(text), text
    for text in ("", "床前明月光，疑是地上霜，\n举头望明月，低头思故乡。",  # a line ends with ，
                 "床前明月光，疑是地上霜。",  # two clauses
                 "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n床前明月光，疑是地上霜。",  # six
                 "床前明月光，疑是地上霜。\n举头望明月，低头思故乡啊。",  # one clause of six characters
                 "床前明月，疑是地上。\n举头望月，低头思乡。",  # four characters
                 "静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",  # a title line is not a clause
                 "床前明月光，疑是地上霜。\n举头望明、月，低头思故乡。"):  # 、 ends a clause too
        assert not well_formed_poem(text), text
    assert poem_clauses(quatrain) == ["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。"]
    assert poem_clauses(quatrain + "\n。") == poem_clauses(quatrain)  # the stray mark is no clause
    assert poem_clauses("床前明月光，疑是地上霜？。\n举头望明月，低头思故乡。") == \
        ["床前明月光，", "疑是地上霜？", "举头望明月，", "低头思故乡。"]  # a doubled mark: the first one ends it
    assert poem_clauses(regulated)[-1] == "浑欲不胜簪。" and len(poem_clauses(regulated)) == 8
    assert poem_clauses("床前明月光，疑是地上霜。") is None
