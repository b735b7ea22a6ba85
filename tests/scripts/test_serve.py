"""serve.py through real clients: the `openai` package (chat and completions, streamed and not), raw HTTP for
every refusal (each hostile input of issue 23 a 4xx in the OpenAI error shape), the door's Host / key / content-type
policy, 8 concurrent clients that each get the answer they get alone, and the chat page in a browser."""
import json
import subprocess
import sys
import threading

from conftest import ENV, ROOT, raw, start_server, stop_server, tiny_checkpoint
import pytest
import torch

from babyllama.dist import free_port
from babyllama.generate import generate
from tokenizer.chat_template import encode_prompt, stop_ids

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A context-64 model behind an API key, with small limits."""
    ckpt, model, tok = tiny_checkpoint(tmp_path_factory.mktemp("serve"))
    proc, port = start_server(ckpt, f"--api_key={KEY}", "--model_name=tiny", "--max_tokens_limit=24",
                                 "--max_body_bytes=4096")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    yield {"port": port, "client": client, "model": model, "tok": tok, "ckpt": ckpt}
    stop_server(proc)


@pytest.fixture(scope="module")
def ctx128(tmp_path_factory):
    """A context-128 model (the demo's) with every setting at its default: no key, max_tokens limit 64, 1 MiB bodies."""
    ckpt, model, tok = tiny_checkpoint(tmp_path_factory.mktemp("serve128"), ctx=128)
    proc, port = start_server(ckpt, "--model_name=tiny")
    yield {"port": port, "model": model, "tok": tok}
    stop_server(proc)


def our_greedy(server, ids, n):
    """What our generator answers to ids, greedy, as text up to the first stop token."""
    tok, model = server["tok"], server["model"]
    out = generate(model, torch.tensor([ids]), n, temperature=0.0, stop_ids=stop_ids(tok))[0]
    return tok.decode([t for t in out if t not in stop_ids(tok)])


def api(server, path, body, key=KEY, method="POST"):
    status, answer, _ = raw(server["port"], method, path, body, key=key)
    return status, answer


MSGS = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "请写一首题为《静夜思》的诗。"}]


def test_models_lists_the_served_model(server):
    assert [m.id for m in server["client"].models.list().data] == ["tiny"]


def test_chat_completion_streamed_and_not_is_our_greedy_answer(server):
    c = server["client"]
    want = our_greedy(server, encode_prompt(server["tok"], MSGS[1:], MSGS[0]["content"]), 20)
    r = c.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(encode_prompt(server["tok"], MSGS[1:], MSGS[0]["content"]))
    assert r.usage.completion_tokens <= 20 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason in ("stop", "length")
    # OpenAI's reference: with include_usage the usage comes alone, in a last chunk with no choices
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completion_streamed_and_not_and_stop_strings(server):
    c, tok = server["client"], server["tok"]
    want = our_greedy(server, [tok.eos_id] + tok.encode("床前明月光，"), 16)
    r = c.completions.create(model="tiny", prompt="床前明月光，", temperature=0, max_tokens=16)
    assert r.choices[0].text == want
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="床前明月光，", temperature=0, max_tokens=16, stream=True))
    assert streamed == want
    stop = want[3:5]  # a stop string inside the answer: the text ends right before it
    r = c.completions.create(model="tiny", prompt="床前明月光，", temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].text == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server):
    c = server["client"]
    a, b, other = (c.chat.completions.create(model="tiny", messages=MSGS, temperature=1.0, top_p=0.9, seed=seed,
                                             max_tokens=12).choices[0].message.content for seed in (7, 7, 8))
    assert a == b and a != other  # the seed decides the sample (and is used: another seed, another sample)


@pytest.mark.parametrize("body,key,status,code", [
    (b"{not json", KEY, 400, "invalid_json"),
    ({"model": "gpt-4", "messages": MSGS}, KEY, 404, "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "床前明月光" * 40}]}, KEY, 400,
     "context_length_exceeded"),
    ({"model": "tiny", "messages": MSGS, "max_tokens": 25}, KEY, 400, "max_tokens_too_large"),
    ({"model": "tiny", "messages": MSGS}, "wrong", 401, "invalid_api_key"),
    ({"model": "tiny", "messages": MSGS}, None, 401, "invalid_api_key"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}, KEY, 413, "body_too_large"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, KEY, 400, "invalid_messages"),
    ({"model": "tiny", "messages": MSGS, "temperature": "hot"}, KEY, 400, "invalid_temperature"),
])
def test_bad_requests_get_a_clear_4xx(server, body, key, status, code):
    got, answer = api(server, "/v1/chat/completions", body, key)
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"]


U = '"messages": [{"role": "user", "content": "你好"}]'
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
# issue 23's hostile inputs and their kin: (what, path, body, status, code); bodies are raw JSON text
HOSTILE = [
    ("max_tokens 1e999", CHAT, f'{{{U}, "max_tokens": 1e999}}', 400, "invalid_max_tokens"),
    ("max_tokens Infinity", CHAT, f'{{{U}, "max_tokens": Infinity}}', 400, "invalid_max_tokens"),
    ("max_tokens -Infinity", CHAT, f'{{{U}, "max_tokens": -Infinity}}', 400, "invalid_max_tokens"),
    ("max_tokens NaN", CHAT, f'{{{U}, "max_tokens": NaN}}', 400, "invalid_max_tokens"),
    ("temperature NaN", CHAT, f'{{{U}, "temperature": NaN}}', 400, "invalid_temperature"),
    ("top_p 1e999", COMP, '{"prompt": "x", "top_p": 1e999}', 400, "invalid_top_p"),
    ("JSON nested 100,000 deep", CHAT, '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "invalid_json"),
    ("JSON nested 40 deep", CHAT, '{"messages": ' + "[" * 40 + "]" * 40 + "}", 400, "invalid_json"),
    ("a lone surrogate in a message", CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "invalid_string"),
    ("a lone surrogate in a prompt", COMP, '{"prompt": "\\udfff"}', 400, "invalid_string"),
    ("a lone surrogate in a key", CHAT, f'{{{U}, "\\ud800": 1}}', 400, "invalid_string"),
    ("seed 2**64", CHAT, f'{{{U}, "seed": {2 ** 64}}}', 400, "invalid_seed"),
    ("seed 1.5", CHAT, f'{{{U}, "seed": 1.5}}', 400, "invalid_seed"),
    ("stream_options a string", CHAT, f'{{{U}, "stream": true, "stream_options": "yes"}}', 400,
     "invalid_stream_options"),
    ("stream_options a list", CHAT, f'{{{U}, "stream": true, "stream_options": []}}', 400, "invalid_stream_options"),
    ("stream_options without stream", CHAT, f'{{{U}, "stream_options": {{"include_usage": true}}}}', 400,
     "invalid_stream_options"),
    ("include_usage a string", CHAT, f'{{{U}, "stream": true, "stream_options": {{"include_usage": "yes"}}}}', 400,
     "invalid_include_usage"),
    ('stop [""]', CHAT, f'{{{U}, "stop": [""]}}', 400, "invalid_stop"),
    ('stop ""', COMP, '{"prompt": "x", "stop": ""}', 400, "invalid_stop"),
    ("5 stop strings", CHAT, f'{{{U}, "stop": ["a", "b", "c", "d", "e"]}}', 400, "invalid_stop"),
    ("a stop string of 65 characters", CHAT, f'{{{U}, "stop": "{"x" * 65}"}}', 400, "invalid_stop"),
    ("stop a number", CHAT, f'{{{U}, "stop": 5}}', 400, "invalid_stop"),
    ('stream "false"', CHAT, f'{{{U}, "stream": "false"}}', 400, "invalid_stream"),
    ("stream 1", CHAT, f'{{{U}, "stream": 1}}', 400, "invalid_stream"),
    ("tools", CHAT, f'{{{U}, "tools": [{{"type": "function"}}]}}', 400, "unsupported_parameter"),
    ("logit_bias", CHAT, f'{{{U}, "logit_bias": {{"5": 10}}}}', 400, "unsupported_parameter"),
    ("logprobs true", CHAT, f'{{{U}, "logprobs": true}}', 400, "unsupported_parameter"),
    ("top_logprobs 3", CHAT, f'{{{U}, "top_logprobs": 3}}', 400, "unsupported_parameter"),
    ("response_format json_object", CHAT, f'{{{U}, "response_format": {{"type": "json_object"}}}}', 400,
     "unsupported_parameter"),
    ("echo true", COMP, '{"prompt": "x", "echo": true}', 400, "unsupported_parameter"),
    ("n 2", CHAT, f'{{{U}, "n": 2}}', 400, "invalid_n"),
    ("n true", CHAT, f'{{{U}, "n": true}}', 400, "invalid_n"),
    ("max_tokens true", CHAT, f'{{{U}, "max_tokens": true}}', 400, "invalid_max_tokens"),
    ("max_tokens 2.5", CHAT, f'{{{U}, "max_tokens": 2.5}}', 400, "invalid_max_tokens"),
    ("max_tokens 0", CHAT, f'{{{U}, "max_tokens": 0}}', 400, "invalid_max_tokens"),
    ("max_tokens over the limit", CHAT, f'{{{U}, "max_tokens": 65}}', 400, "max_tokens_too_large"),
    ("max_tokens 2**70", CHAT, f'{{{U}, "max_tokens": {2 ** 70}}}', 400, "invalid_max_tokens"),
    ("max_completion_tokens differs", CHAT, f'{{{U}, "max_tokens": 5, "max_completion_tokens": 6}}', 400,
     "invalid_max_tokens"),
    ("frequency_penalty 3", CHAT, f'{{{U}, "frequency_penalty": 3}}', 400, "invalid_frequency_penalty"),
    ("top_k -1", CHAT, f'{{{U}, "top_k": -1}}', 400, "invalid_top_k"),
    ("content an object", CHAT, '{"messages": [{"role": "user", "content": {"a": 1}}]}', 400, "invalid_messages"),
    ("a message with a name", CHAT, '{"messages": [{"role": "user", "content": "x", "name": "a"}]}', 400,
     "invalid_messages"),
    ("a tool message", CHAT, '{"messages": [{"role": "tool", "content": "x"}]}', 400, "invalid_messages"),
    ("prompt a list of token ids", COMP, '{"prompt": [1, 2, 3]}', 400, "invalid_prompt"),
    ("a body that is a list", CHAT, "[]", 400, "invalid_json"),
    ("a body that is not UTF-8", CHAT, b"\xff\xfe{}", 400, "invalid_json"),
    ("an empty body", CHAT, b"", 400, "invalid_json"),
    ("model a number", CHAT, f'{{{U}, "model": 5}}', 404, "model_not_found"),
]


@pytest.mark.parametrize("what,path,body,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_every_hostile_input_gets_its_4xx_in_the_openai_shape(ctx128, what, path, body, status, code):
    got, answer, _ = raw(ctx128["port"], "POST", path, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    if code == "unsupported_parameter":  # refused by name
        assert answer["error"]["param"] in what and answer["error"]["param"] in answer["error"]["message"]
    assert raw(ctx128["port"], "POST", CHAT, {"messages": MSGS[1:], "max_tokens": 2})[0] == 200  # still serving


@pytest.mark.parametrize("what,method,path,headers,status,code", [
    ("an unknown path", "GET", "/v1/nothing", {}, 404, "not_found"),
    ("GET on a POST route", "GET", CHAT, {}, 405, "method_not_allowed"),
    ("a text/plain body (a form a web page may post)", "POST", CHAT, {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("no Content-Type", "POST", CHAT, {"Content-Type": None}, 415, "unsupported_media_type"),
    ("a foreign Host (DNS rebinding)", "POST", CHAT, {"Host": "evil.example"}, 400, "invalid_host"),
    ("a foreign Host with a port", "GET", "/v1/models", {"Host": "evil.example:8000"}, 400, "invalid_host"),
    ("a foreign Host on the page", "GET", "/", {"Host": "evil.example"}, 400, "invalid_host"),
    ("a Content-Length over the limit", "POST", CHAT, {"Content-Type": "application/json",
                                                             "Content-Length": str(2 << 20)}, 413, "body_too_large"),
])
def test_every_route_and_header_refusal_is_in_the_openai_shape(ctx128, what, method, path, headers, status, code):
    body = json.dumps({"messages": MSGS[1:], "max_tokens": 2}) if method == "POST" else None
    if "Content-Length" in headers:  # announce more than is sent: refused before reading
        body = None
    got, answer, _ = raw(ctx128["port"], method, path, body, headers=headers)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_loopback_names_are_hosts_of_a_loopback_server(ctx128):
    for h in ("localhost", "localhost:1234", "127.0.0.1", "[::1]:99"):
        assert raw(ctx128["port"], "GET", "/v1/models", headers={"Host": h})[0] == 200, h


def test_with_a_key_every_route_but_the_page_and_health_needs_it(server):
    port = server["port"]
    assert raw(port, "GET", "/")[0] == 200 and raw(port, "GET", "/health")[0] == 200
    for method, path in (("GET", "/stats"), ("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/docs"),
                         ("GET", "/nothing"), ("POST", CHAT), ("POST", COMP)):
        for key in (None, "wrong", KEY[:-1], KEY + "x"):
            got, answer, _ = raw(port, method, path, {} if method == "POST" else None, key=key)
            assert (got, answer["error"]["code"]) == (401, "invalid_api_key"), (method, path, key)
    assert raw(port, "GET", "/stats", key=KEY)[0] == 200
    assert raw(port, "GET", "/openapi.json", key=KEY)[0] == 404  # no schema served at all


def test_the_implemented_parameters_do_what_they_say(ctx128):
    port, tok = ctx128["port"], ctx128["tok"]
    ids = encode_prompt(tok, MSGS[1:], MSGS[0]["content"])
    greedy = our_greedy(ctx128, ids, 6)

    def ask(**kw):
        got, answer, _ = raw(port, "POST", CHAT, dict({"messages": MSGS, "temperature": 0}, **kw))
        assert got == 200, answer
        return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]

    assert ask(max_completion_tokens=6)[0] == greedy
    assert ask(max_tokens=6, max_completion_tokens=6, logprobs=False, response_format={"type": "text"},
               user="u1", top_k=0, n=1)[0] == greedy
    assert ask(max_tokens=6, temperature=1.0, top_k=1)[0] == greedy  # top_k 1 is greedy whatever the temperature
    parts = [{"role": "developer", "content": MSGS[0]["content"]},
             {"role": "user", "content": [{"type": "text", "text": MSGS[1]["content"][:4]},
                                          {"type": "text", "text": MSGS[1]["content"][4:]}]}]
    assert ask(messages=parts, max_tokens=6)[0] == greedy  # a developer message and text parts: the same prompt
    text, n = ask()  # no max_tokens: the default, lowered to the limit and to what the prompt leaves
    assert n <= min(64, 128 - len(ids)) and text == our_greedy(ctx128, ids, min(64, 128 - len(ids)))
    assert ask(max_tokens=20, presence_penalty=2.0, frequency_penalty=2.0)[0] != ask(max_tokens=20)[0]


def test_eight_concurrent_clients_each_get_their_own_greedy_answer(server):
    c = server["client"]
    prompts = [f"请写一首题为《{t}》的诗。" for t in "春夏秋冬山水风月"]
    alone = [c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], temperature=0,
                                       max_tokens=16).choices[0].message.content for p in prompts]
    together = [None] * 8
    barrier = threading.Barrier(8)

    def ask(i):
        barrier.wait()
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                           temperature=0, max_tokens=16, stream=True)
        together[i] = "".join(ch.choices[0].delta.content or "" for ch in stream)

    before = api(server, "/stats", None, method="GET")[1]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    after = api(server, "/stats", None, method="GET")[1]
    assert together == alone and len(set(alone)) > 1  # different prompts, different answers, none mixed
    assert after["requests"] - before["requests"] == 8
    # some rows were decoded together: fewer steps than rows decoded
    assert after["row_steps"] - before["row_steps"] > after["steps"] - before["steps"]


def test_the_chat_page_is_served(server):
    status, page, headers = raw(server["port"], "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page
    assert "<script src" not in page and "<link" not in page  # nothing fetched from elsewhere


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Debian's chromium + chromium-driver, through selenium), or a skip saying what is missing."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium / chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield driver
    driver.quit()


def send_on_page(driver, text, n):
    """Type text into the page, send it, wait for the n-th reply to finish; the reply's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == n and
                                    d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute(
                                        "data-done") == "true")
    return driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text


def test_chat_page_in_a_real_browser_streams_two_turns(server, browser):
    """The page loads, sends a message, shows the streamed reply, sends a second turn that carries the first; a
    screenshot goes to out/."""
    import os

    from selenium.webdriver.common.by import By
    browser.get(f"http://127.0.0.1:{server['port']}/")
    browser.execute_script("document.getElementById('key').value = arguments[0];"
                           "document.getElementById('temperature').value = '0';"
                           "document.getElementById('max_tokens').value = '12';", KEY)
    history = []
    for n, text in enumerate(["你好", "请写一首题为《春》的诗。"], 1):
        reply = send_on_page(browser, text, n)
        history.append({"role": "user", "content": text})
        # the page sent the whole conversation: the reply is our greedy answer to it
        want = our_greedy(server, encode_prompt(server["tok"], history), 12)
        assert reply == want.strip() or reply == want
        history.append({"role": "assistant", "content": want})
        assert "pieces/s" in browser.find_element(By.ID, "status").text  # it streamed, and says how fast
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    os.makedirs(os.path.join(ROOT, "out"), exist_ok=True)
    browser.save_screenshot(os.path.join(ROOT, "out", "serve_page.png"))


def test_chat_page_works_with_its_defaults_on_a_context_128_model(ctx128, browser):
    """Issue 23: the page's max_tokens (128 before) was over a context-128 model's limit (64), so every message was
    refused. Now its default and its maximum come from /v1/models."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(f"http://127.0.0.1:{ctx128['port']}/")
    box = browser.find_element(By.ID, "max_tokens")
    WebDriverWait(browser, 10).until(lambda d: box.get_attribute("value"))
    assert (box.get_attribute("value"), box.get_attribute("max")) == ("64", "64")
    before = raw(ctx128["port"], "GET", "/stats")[1]
    send_on_page(browser, "你好", 1)
    after = raw(ctx128["port"], "GET", "/stats")[1]
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    assert after["finished"] == before["finished"] + 1  # answered, not refused


def test_a_full_queue_is_answered_429(server):
    """A second server that holds one request waiting: of 6 at once, some are refused with queue_full."""
    proc, port = start_server(server["ckpt"], "--max_queue=1", "--max_batch=1", "--model_name=tiny")
    try:
        other = dict(server, port=port)
        codes, barrier = [], threading.Barrier(6)

        def ask():
            barrier.wait()
            codes.append(raw(other["port"], "POST", "/v1/chat/completions",
                                {"model": "tiny", "messages": MSGS, "max_tokens": 24, "temperature": 0}))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(c for c, _, _ in codes)
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}
        assert all(a["error"]["code"] == "queue_full" and int(h["retry-after"]) >= 1 for c, a, h in codes if c == 429)
    finally:
        stop_server(proc)


def test_a_checkpoint_of_another_tokenizer_is_refused(server, tmp_path):
    ckpt = torch.load(server["ckpt"], weights_only=True)
    torch.save(dict(ckpt, tokenizer_sha256="0" * 64), tmp_path / "ckpt.pt")  # trained with another tokenizer
    p = subprocess.run([sys.executable, "serve.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--port={free_port()}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "is not the tokenizer the model was trained with" in p.stderr
