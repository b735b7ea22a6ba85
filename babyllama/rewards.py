"""The rewards an RL run (grpo.py, ppo.py) can optimise, by name: REWARDS is the one list, read by the check of the
`reward` setting, its message and the construction. A reward is fn(requests, replies) -> one float per reply."""
from babyllama.poetry_rewards import load_tone_table, poetry_reward
from babyllama.reward_model import load_reward_model, score_conversations


def form_rules(_, weights, tone_table, poetry, **unused):
    """'poetry': poetry_reward with weights = (form, repeats, title, tones); the tone table (built from the corpus at
    poetry if missing) is read only when the tones' weight is > 0."""
    try:
        tones = load_tone_table(tone_table, poetry) if weights[3] else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"w_tone > 0 needs the tone table {tone_table}: {e}") from e
    return lambda qs, rs: [poetry_reward(q, r, *weights, tones) for q, r in zip(qs, rs)]


def model_scalar(_, reward_ckpt, tok, device, **unused):
    """'model': the reward model's scalar (reward_ckpt) for each request and reply as a one-turn conversation."""
    rm = load_reward_model(reward_ckpt, device)[0]
    rm.requires_grad_(False)
    return lambda qs, rs: score_conversations(rm, tok, [{"messages": [{"role": "user", "content": q},
                                                                      {"role": "assistant", "content": r}]}
                                                        for q, r in zip(qs, rs)], device)


def char_share(char, **unused):
    """'char:X': the share of the reply's characters that are X."""
    return lambda qs, rs: [r.count(char) / max(len(r), 1) for r in rs]


# name -> (builder, what it rewards); a name ending in ":X" takes one character after its colon
REWARDS = {
    "poetry": (form_rules, "the requested 五言/七言 绝句/律诗 form, no repeated clauses, optionally the title and the "
                           "平仄 tones (w_form, w_repeat, w_title, w_tone; babyllama/poetry_rewards.py)"),
    "model": (model_scalar, "a reward model's scalar (reward_ckpt, trained by reward_model.py)"),
    "char:X": (char_share, "the share of the reply's characters that are X: a toy objective the tests use to check "
                           "that a loop optimises"),
}


def registry_name(kind):
    """The REWARDS name of a `reward` setting ('char:月' -> 'char:X'), or None when it names none."""
    if kind in REWARDS and not kind.endswith(":X"):
        return kind
    name, colon, arg = kind.partition(":")
    return name + ":X" if colon and len(arg) == 1 and name + ":X" in REWARDS else None


def check_reward(kind):
    """SystemExit, listing REWARDS, unless kind names one (the scripts call it before loading a model)."""
    if registry_name(kind) is None:
        choices = "\n".join(f"  {name}: {what}" for name, (_, what) in REWARDS.items())
        raise SystemExit(f"reward must be one of these (X: one character), not {kind!r}:\n{choices}")


def reward_function(kind, **settings):
    """The reward fn(requests, replies) -> list of floats named by kind. settings, what the builders read: weights,
    tone_table, poetry ('poetry'); reward_ckpt, tok, device ('model'). SystemExit for an unknown kind."""
    check_reward(kind)
    build, _ = REWARDS[registry_name(kind)]
    return build(kind.partition(":")[2], **settings)
