"""The OpenAI API's request bodies as serve.py accepts them: parsed, checked, and turned into a prompt and generation
settings. Every bad input is an APIError (a 4xx naming the parameter), never an exception of another kind.

Implemented: model, messages (text content, or a list of text parts), prompt, max_tokens, max_completion_tokens,
temperature, top_p, top_k (an extension, as vLLM's), frequency_penalty, presence_penalty, stop, seed, n (1), stream,
stream_options.include_usage, user (ignored, as it only identifies the end user). Accepted at their no-op value only:
logprobs (false / null), top_logprobs (null, 0), response_format ({"type": "text"}), echo (false), best_of (1),
suffix (null). Anything else (tools, logit_bias, ...) is refused by name."""
from dataclasses import dataclass
import json
import math

from tokenizer.chat_template import encode_prompt

MAX_DEPTH = 32  # JSON nesting the API needs is 4 (messages / content parts); deeper is refused
MAX_STOPS, MAX_STOP_CHARS = 4, 64
INT64 = 1 << 63


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status; headers: extra
    response headers (Retry-After)."""

    def __init__(self, status, message, code, param=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self):
        """The JSON answer; text that UTF-8 cannot encode (a lone surrogate echoed back) is backslash-escaped."""
        return {"error": {"message": printable(self.message), "type": self.kind,
                          "param": None if self.param is None else printable(self.param), "code": self.code}}


def printable(s):
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Settings:
    """What a request asks for, checked: tokens to generate at most, sampling (a scheduler.Sampling's fields as a
    dict), stop strings, streaming and whether usage goes in a final chunk."""
    max_tokens: int
    sampling: dict
    stops: tuple
    stream: bool
    include_usage: bool


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty", "stop",
          "seed", "n", "stream", "stream_options", "user", "logprobs"}
NO_OP = {"logprobs": (False, None, 0), "top_logprobs": (None, 0), "echo": (False, None), "best_of": (1, None),
         "suffix": (None,)}
PARAMS = {"chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"},
          "completion": COMMON | {"prompt", "echo", "best_of", "suffix"}}


def parse_body(raw):
    """raw bytes -> the request's JSON object. Non-finite numbers (1e999, NaN, Infinity) become float inf / nan for
    the parameter checks to refuse by name. APIError 400 for text that is not UTF-8 JSON, nesting deeper than
    MAX_DEPTH, a string that is not valid Unicode (a lone surrogate), or anything but an object."""
    try:
        body = json.loads(raw, parse_constant=float)
    except RecursionError:
        raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels", "invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_json")
    check_tree(body)
    return body


def check_tree(body):
    """APIError 400 for nesting deeper than MAX_DEPTH or a string (key or value) that UTF-8 cannot encode."""
    todo = [(body, "", 1)]
    while todo:
        node, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels (at {path})", "invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
            for s in (key, value):
                if isinstance(s, str) and not valid_unicode(s):
                    raise APIError(400, f"{where.lstrip('.')} is not valid Unicode (a lone surrogate?)",
                                   "invalid_string", where.lstrip("."))
            if isinstance(value, (dict, list)):
                todo.append((value, where, depth + 1))


def valid_unicode(s):
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def refuse_unknown(body, kind):
    """APIError 400 naming the parameters this server does not implement, or those set to a value it cannot honour."""
    unknown = sorted(set(body) - PARAMS[kind])
    if unknown:
        raise APIError(400, f"unsupported parameter(s): {', '.join(unknown)}", "unsupported_parameter", unknown[0])
    for name, allowed in NO_OP.items():
        if name in body and not any(body[name] is a or (type(body[name]) is type(a) and body[name] == a)
                                    for a in allowed):
            raise APIError(400, f"{name}={body[name]!r} is not supported (only {allowed})", "unsupported_parameter",
                           name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, 'only response_format {"type": "text"} is supported', "unsupported_parameter",
                       "response_format")


def number(body, name, default, lo, hi, integer=False):
    """body[name] as a number in [lo, hi] (default when absent or null); APIError 400 naming it otherwise (a bool,
    a string, a non-finite or fractional value where an integer is wanted, one out of range)."""
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)
    ok = ok and lo <= v <= hi and (not integer or float(v).is_integer())
    if not ok:
        what = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {what} in [{lo}, {hi}], not {json.dumps(v)}", f"invalid_{name}", name)
    return int(v) if integer else float(v)


def flag(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be true or false, not {json.dumps(v)}", f"invalid_{name}", name)
    return v


def max_tokens_of(body, prompt_len, context, limit, default):
    """The request's max_tokens (or max_completion_tokens): at most limit, and prompt + it within context. Absent:
    default, lowered to what the context leaves. APIError 400 otherwise."""
    a = number(body, "max_tokens", None, 1, INT64 - 1, integer=True)
    b = number(body, "max_completion_tokens", None, 1, INT64 - 1, integer=True)
    if a is not None and b is not None and a != b:
        raise APIError(400, "max_tokens and max_completion_tokens differ", "invalid_max_tokens", "max_tokens")
    asked = a if a is not None else b
    room = context - prompt_len
    n = min(default, limit, room) if asked is None else asked
    if n > limit:
        raise APIError(400, f"max_tokens {n} is over this server's limit of {limit}", "max_tokens_too_large",
                       "max_tokens")
    if n > room or room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; with max_tokens {max(n, 1)} that is over the "
                            f"model's context of {context} tokens", "context_length_exceeded", "messages")
    return n


def stops_of(body):
    """stop: null, a string or a list of up to MAX_STOPS non-empty strings of at most MAX_STOP_CHARS characters."""
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} "
                            f"characters", "invalid_stop", "stop")
    return tuple(stops)


def settings(body, prompt_len, context, limit, default_max_tokens):
    """Settings of a request whose prompt has prompt_len tokens, on a model of context tokens; APIError 400 naming
    the first bad parameter."""
    if body.get("n") not in (1, None) or isinstance(body.get("n"), bool):
        raise APIError(400, "only n=1 is supported", "invalid_n", "n")
    max_tokens = max_tokens_of(body, prompt_len, context, limit, default_max_tokens)
    sampling = dict(temperature=number(body, "temperature", 1.0, 0.0, 2.0), top_p=number(body, "top_p", 1.0, 0.0, 1.0),
                    top_k=number(body, "top_k", 0, 0, 1 << 31, integer=True),
                    frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                    presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
                    seed=number(body, "seed", None, -INT64, INT64 - 1, integer=True))
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, 'stream_options must be {"include_usage": true|false}, and only with stream: true',
                       "invalid_stream_options", "stream_options")
    include_usage = flag(options or {}, "include_usage")
    return Settings(max_tokens, sampling, stops_of(body), stream, include_usage)


def content_text(content, i):
    """A message's content: a string, or a list of {"type": "text", "text": str} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "invalid_messages",
                   f"messages[{i}].content")


def chat_prompt(tok, body):
    """The prompt ids of a chat request: an optional first system (or developer) message, then user / assistant
    turns alternating and ending with a user turn."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    system, turns = None, []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant") or \
                set(m) - {"role", "content"}:
            raise APIError(400, f'messages[{i}] must be {{"role": system|user|assistant, "content": ...}}',
                           "invalid_messages", f"messages[{i}]")
        text = content_text(m.get("content"), i)
        if m["role"] in ("system", "developer"):
            if i:
                raise APIError(400, "a system message may only come first", "invalid_messages", f"messages[{i}]")
            system = text
        else:
            turns.append({"role": m["role"], "content": text})
    if not turns or turns[-1]["role"] != "user" or any(t["role"] != ("user", "assistant")[k % 2]
                                                       for k, t in enumerate(turns)):
        raise APIError(400, "messages must alternate user/assistant and end with a user message", "invalid_messages",
                       "messages")
    return encode_prompt(tok, turns, system)


def completion_prompt(tok, body):
    """The prompt ids of a completion request: eos (a document start, as in pretraining), then the text."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (or a list of one string)", "invalid_prompt", "prompt")
    return [tok.eos_id] + tok.encode(prompt)


def request_of(tok, body, kind, context, limit, default_max_tokens):
    """(prompt ids, Settings) of a checked body of kind 'chat' or 'completion'."""
    refuse_unknown(body, kind)
    prompt = (chat_prompt if kind == "chat" else completion_prompt)(tok, body)
    return prompt, settings(body, len(prompt), context, limit, default_max_tokens)
