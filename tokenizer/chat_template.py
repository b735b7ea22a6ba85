"""
The chat template, defined once: sft.py, dpo.py, eval.py and the server all build token sequences here.

A conversation is an optional system prompt and turns {"role": "user"|"assistant", "content": str}:

    <|system|>{system}<|end|><|user|>{q1}<|end|><|assistant|>{a1}<|end|><|user|>{q2}<|end|><|assistant|>{a2}<|end|>

The role markers and <|end|> are control tokens reserved by the tokenizer (tokenizer.SPECIAL_TOKENS), so a
user who types "<|end|>" gets plain characters and cannot forge a turn boundary. The content is encoded on
its own, exactly as Tokenizer.encode does, so decode(content ids) == content. Generation is prompted with
the conversation so far followed by <|assistant|> and stops on <|end|> (stop_ids()).

Labels for supervised fine-tuning (encode_conversation): aligned with the ids, -1 (ignored) everywhere
except the content tokens of every assistant turn and the <|end|> that closes it. The system and user
turns, and the template tokens before a reply (its <|assistant|> marker), are never scored. The trainer
predicts ids[t + 1] from ids[:t + 1], so it pairs x = ids[:-1] with y = labels[1:].
"""

ROLES = ("system", "user", "assistant")
IGNORE = -1


def _check(tok):
    missing = [n for n, i in (("<|system|>", tok.system_id), ("<|user|>", tok.user_id),
                               ("<|assistant|>", tok.assistant_id), ("<|end|>", tok.end_id)) if i is None]
    if missing:
        raise ValueError(f"{tok.model_path} lacks the chat control tokens {missing}; "
                         f"train it with tokenizer/train_tokenizer.py")


def role_id(tok, role):
    return {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}[role]


def encode_conversation(tok, messages, system=None):
    """(ids, labels) of a whole conversation; labels[i] == ids[i] exactly on assistant content and on
    the <|end|> closing each assistant turn, IGNORE elsewhere. A leading {"role": "system"} message is
    accepted in place of `system`."""
    _check(tok)
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        if system:
            raise ValueError("system prompt given twice (argument and first message)")
        system, messages = messages[0]["content"], messages[1:]
    ids, labels = [], []

    def add(tokens, scored):
        ids.extend(tokens)
        labels.extend(tokens if scored else [IGNORE] * len(tokens))

    if system:
        add([tok.system_id] + tok.encode(system) + [tok.end_id], False)
    for m in messages:
        role = m["role"]
        if role not in ("user", "assistant"):
            raise ValueError(f"role {role!r} inside a conversation (system only comes first)")
        add([role_id(tok, role)], False)
        add(tok.encode(m["content"]) + [tok.end_id], role == "assistant")
    return ids, labels


def encode_prompt(tok, messages, system=None):
    """Ids to generate the next assistant reply from: the conversation so far (ending with a user turn)
    followed by <|assistant|>."""
    ids, _ = encode_conversation(tok, messages, system)
    return ids + [tok.assistant_id]


def stop_ids(tok):
    """Generation stops on end-of-turn (and on eos, which a model fresh from pretraining emits)."""
    return [i for i in (tok.end_id, tok.eos_id) if i is not None and i >= 0]


def render(messages, system=None, add_generation_prompt=False):
    """The template as text, for reading and debugging (training and generation use the ids)."""
    parts = [f"<|system|>{system}<|end|>"] if system else []
    parts += [f"<|{m['role']}|>{m['content']}<|end|>" for m in messages]
    return "".join(parts) + ("<|assistant|>" if add_generation_prompt else "")


def decode_reply(tok, ids):
    """Text of a generated reply: everything before the first stop token."""
    stops = set(stop_ids(tok))
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(i)
    return tok.decode(out)
