"""babyllama/rewards.py, the one registry of rewards: a reward by its name (a character's share, the poetry rules
with their weights), and a name not in it refused with a message that lists every reward."""
from conftest import JING_YE_SI
import pytest

from babyllama.poetry_rewards import make_request
from babyllama.rewards import REWARDS, check_reward, reward_function


def test_rewards_come_from_one_registry():
    assert reward_function("char:月")(["q", "q"], ["明月", "x"]) == [0.5, 0.0]
    ask, poem = make_request("静夜思", 5, 4), JING_YE_SI
    assert reward_function("poetry", weights=(1.0, 0.5, 0.0, 0.0), tone_table="", poetry="")([ask], [poem]) == [1.5]
    for bad in ("char:", "char:ab", "Poetry", "char:X:Y", "model:x"):
        with pytest.raises(SystemExit, match="reward must be one of") as e:
            check_reward(bad)
        assert all(name in str(e.value) for name in REWARDS)  # the message lists every reward

