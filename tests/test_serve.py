"""serve.py through real clients: the `openai` package (chat and completions, streamed and not), raw HTTP for
every refusal, and 8 concurrent clients that each get the answer they get alone."""
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

from conftest import ENV, ROOT
import pytest
from sft_fixtures import tiny_tokenizer
import torch

from babyllama.models import save_merged
from babyllama.generate import generate
from model import ModelArgs, Transformer
from tokenizer.chat_template import encode_prompt, stop_ids

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
KEY = "test-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    tok = tiny_tokenizer(d)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=64, multiple_of=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    save_merged(str(d / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=tok.model_path,
                tokenizer_sha256=tok.sha256())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt_path={d / 'ckpt.pt'}", f"--port={port}",
                             f"--api_key={KEY}", "--model_name=tiny", "--max_tokens_limit=24",
                             "--max_body_bytes=4096", "--dtype=float32"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    yield {"port": port, "client": client, "model": model, "tok": tok, "ckpt": d / "ckpt.pt"}
    proc.terminate()
    proc.wait(timeout=10)


def our_greedy(server, ids, n):
    """What our generator answers to ids, greedy, as text up to the first stop token."""
    tok, model = server["tok"], server["model"]
    out = generate(model, torch.tensor([ids]), n, temperature=0.0, stop_ids=stop_ids(tok))[0]
    return tok.decode([t for t in out if t not in stop_ids(tok)])


def raw(server, path, body, key=KEY, method="POST"):
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    c.request(method, path, body=body if isinstance(body, (bytes, str)) else json.dumps(body), headers=headers)
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"null")


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
    got, answer = raw(server, "/v1/chat/completions", body, key)
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"]


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

    before = raw(server, "/stats", None, method="GET")[1]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    after = raw(server, "/stats", None, method="GET")[1]
    assert together == alone and len(set(alone)) > 1  # different prompts, different answers, none mixed
    assert after["requests"] - before["requests"] == 8
    # some rows were decoded together: fewer steps than rows decoded
    assert after["row_steps"] - before["row_steps"] > after["steps"] - before["steps"]


def test_the_chat_page_is_served(server):
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    c.request("GET", "/")
    r = c.getresponse()
    page = r.read().decode()
    assert r.status == 200 and "/v1/chat/completions" in page
    assert "<script src" not in page and "<link" not in page  # nothing fetched from elsewhere


def test_chat_page_in_a_real_browser_streams_two_turns(server, tmp_path):
    """Headless Chromium (Debian's chromium + chromium-driver, through selenium) loads the page, sends a
    message, sees the streamed reply, sends a second turn that carries the first; a screenshot goes to out/."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium / chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{server['port']}/")
        driver.execute_script("document.getElementById('key').value = arguments[0];"
                              "document.getElementById('temperature').value = '0';"
                              "document.getElementById('max_tokens').value = '12';", KEY)
        tok = server["tok"]
        turns = ["你好", "请写一首题为《春》的诗。"]
        history = []
        for n, text in enumerate(turns, 1):
            box = driver.find_element(By.ID, "input")
            box.send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == n and
                                            d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute(
                                                "data-done") == "true")
            history.append({"role": "user", "content": text})
            reply = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
            # the page sent the whole conversation: the reply is our greedy answer to it
            want = our_greedy(server, encode_prompt(tok, history), 12)
            assert reply == want.strip() or reply == want
            history.append({"role": "assistant", "content": want})
            assert "pieces/s" in driver.find_element(By.ID, "status").text  # it streamed, and says how fast
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        import os

        from conftest import ROOT
        os.makedirs(os.path.join(ROOT, "out"), exist_ok=True)
        driver.save_screenshot(os.path.join(ROOT, "out", "serve_page.png"))
    finally:
        driver.quit()


def test_a_full_queue_is_answered_429(server):
    """A second server that holds one request waiting: of 6 at once, some are refused with queue_full."""
    port = free_port()
    ckpt = server["ckpt"]
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt_path={ckpt}", f"--port={port}", "--max_queue=1",
                             "--max_batch=1", "--model_name=tiny", "--dtype=float32"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        other = dict(server, port=port)
        codes, barrier = [], threading.Barrier(6)

        def ask():
            barrier.wait()
            codes.append(raw(other, "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 24,
                                                              "temperature": 0}, key=None))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(c for c, _ in codes)
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}
        assert all(a["error"]["code"] == "queue_full" for c, a in codes if c == 429)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_checkpoint_of_another_tokenizer_is_refused(server, tmp_path):
    ckpt = torch.load(server["ckpt"], weights_only=True)
    torch.save(dict(ckpt, tokenizer_sha256="0" * 64), tmp_path / "ckpt.pt")  # trained with another tokenizer
    p = subprocess.run([sys.executable, "serve.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--port={free_port()}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "is not the tokenizer the model was trained with" in p.stderr
