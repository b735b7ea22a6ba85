"""The chat template, defined once: sft.py, dpo.py, eval.py and the server all build token sequences here.

    <|system|>{system}<|end|><|user|>{q1}<|end|><|assistant|>{a1}<|end|><|user|>{q2}<|end|><|assistant|>{a2}<|end|>

The role markers and <|end|> are control tokens (tokenizer.SPECIAL_TOKENS); content is encoded on its own, as
Tokenizer.encode does. Generation is prompted with the conversation so far plus <|assistant|> and stops on <|end|>. SFT
labels (encode_conversation) are -1 except on every assistant turn's content and closing <|end|>; the trainer pairs x =
ids[:-1] with y = labels[1:]."""

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
    """(ids, labels) of a whole conversation ({"role": "user"|"assistant", "content"} turns): labels[i] == ids[i] on
    assistant content and each assistant turn's closing <|end|>, IGNORE elsewhere. A leading {"role": "system"} message
    may replace `system`. ValueError for a system prompt given twice or a system turn later on."""
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
    """Ids to prompt the next assistant reply: the conversation so far (ending with a user turn), then <|assistant|>."""
    ids, _ = encode_conversation(tok, messages, system)
    return ids + [tok.assistant_id]


def stop_ids(tok):
    """Generation stops on end-of-turn, and on eos (a model fresh from pretraining emits it)."""
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
