"""The server on the golden tiny model: answers equal `predict`'s, streaming equals non-streaming,
32 concurrent clients all answered as one at a time, every bad input refused by name while the
other clients are answered, and the page in a real headless chromium drawing the answer's points.

Servers run in a thread (uvicorn on 127.0.0.1, port 0) and stop at the end of the module."""
import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from molmo_jax import serve as serve_cli
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import Predictor, Request
from molmo_jax.serving.app import ServeConfig, create_app, serving_in_thread
from molmo_jax.serving.batcher import Engine, EngineConfig, Job
from test_download import server  # noqa: F401 (the hostile HTTP server on 127.0.0.1)
from test_predict import checkpoint, image_path, predictor, socket_free_port  # noqa: F401 (fixtures)

MAX_NEW = 6
LIMITS = dict(max_body_bytes=2**20, max_pixels=150 * 150, body_timeout=2.0, request_timeout=60.0)
ENGINE = EngineConfig(max_batch=8, context=1024, chunk=4, max_queue=256)


@pytest.fixture(scope="module")
def url(predictor):
    with serving_in_thread(create_app(predictor, ServeConfig(engine=ENGINE, model_name="tiny", **LIMITS))) as base:
        yield base


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(width, height) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)).save(out, "PNG")
    return out.getvalue()


def body(prompt, image=None, **extra) -> dict:
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_NEW, **extra}


@pytest.fixture(scope="module")
def cases(predictor, image_path):
    """Requests (as bodies) and their answers from Predictor.predict, one request at a time."""
    image = data_url(image_path.read_bytes())
    asks = [("what is in the image", image, "user_qa"), ("how many dogs are there", None, "user_qa"),
            ("point to the cat", image, "pointing"), ("a red circle and a blue square", None, "user_qa")]
    out = []
    for prompt, img, style in asks:
        [answer] = predictor.predict([Request(prompt, image_path.read_bytes() if img else None, style)],
                                     GenerationConfig(max_new_tokens=MAX_NEW))
        out.append((body(prompt, img, style=style), answer))
    return out


def read_sse(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_engine_tokens_equal_predict(predictor, cases, image_path):
    """Three requests through a 2-row engine (the third joins when a row frees): predict's tokens."""
    engine = Engine(predictor, EngineConfig(max_batch=2, context=1024, chunk=3)).start()
    try:
        done, results = threading.Event(), {}
        for index, (request_body, _) in enumerate(cases[:3]):
            prompt, image, style = (request_body["messages"][0]["content"][0]["text"],
                                    image_path.read_bytes() if len(request_body["messages"][0]["content"]) > 1
                                    else None, request_body["style"])

            def on_event(kind, payload, index=index):
                if kind != "delta":
                    results[index] = payload
                    if len(results) == 3:
                        done.set()

            engine.submit(Job(predictor.prepare(Request(prompt, image, style)), MAX_NEW, on_event))
        assert done.wait(120), results
    finally:
        engine.close()
    for index, (_, answer) in enumerate(cases[:3]):
        assert results[index].tokens == answer.tokens.tolist() and results[index].text == answer.text


def test_api_answers_as_predict_and_streams_the_same_text(url, cases):
    with httpx.Client(base_url=url, timeout=60) as client:
        for request_body, answer in cases:
            r = client.post("/v1/chat/completions", json=request_body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["message"]["content"] == answer.text
            assert out["usage"]["completion_tokens"] == len(answer.tokens)
            assert out["model"] == "tiny" and out["object"] == "chat.completion"
            with client.stream("POST", "/v1/chat/completions", json={**request_body, "stream": True}) as s:
                assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
                events = read_sse(s)
            assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
            streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
            assert streamed == answer.text
            assert events[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["slots"] == ENGINE.max_batch


def test_image_from_an_http_url_answers_as_predict(url, server, predictor):
    """An http(s) image_url goes through the bounded downloader; the answer is predict's for it."""
    image = f"{server}/good/0"
    [answer] = predictor.predict([Request("what is in the image", image)], GenerationConfig(max_new_tokens=MAX_NEW))
    r = httpx.post(f"{url}/v1/chat/completions", json=body("what is in the image", image), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answer.text, r.text
    r = httpx.post(f"{url}/v1/chat/completions", json=body("what is in the image", f"{server}/html"), timeout=60)
    assert r.status_code == 400 and "html" in r.json()["error"]["message"]


def test_stop_strings_cut_the_answer_as_predict_does(url, cases, predictor, image_path):
    request_body, answer = cases[0]
    assert len(answer.text) >= 4, answer.text
    stop = answer.text[len(answer.text) // 2:][:2]  # the answer is cut at its first occurrence
    [expected] = predictor.predict([Request("what is in the image", image_path.read_bytes())],
                                   GenerationConfig(max_new_tokens=MAX_NEW, stop_strings=(stop,)))
    with httpx.Client(base_url=url, timeout=60) as client:
        out = client.post("/v1/chat/completions", json={**request_body, "stop": stop}).json()
        with client.stream("POST", "/v1/chat/completions", json={**request_body, "stop": [stop], "stream": True}) as s:
            events = read_sse(s)
    assert out["choices"][0]["message"]["content"] == expected.text and stop not in expected.text
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected.text


def test_32_concurrent_clients_all_answered_as_one_at_a_time(url, cases):
    """32 clients x 4 requests at once: nothing lost, every answer the one-at-a-time answer."""
    async def client_run(client, number):
        answers = []
        for i in range(4):
            request_body, answer = cases[(number + i) % len(cases)]
            r = await client.post("/v1/chat/completions", json=request_body)
            answers.append((r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                            else r.text, answer.text))
        return answers

    async def sampling_client(client):
        """Sampled requests in the same batch: the greedy rows must not change."""
        for i in range(2):
            r = await client.post("/v1/chat/completions", json={**cases[i][0], "temperature": 1.0, "top_p": 0.9})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client_run(client, n) for n in range(32)), sampling_client(client))

    start = time.monotonic()
    results = [a for client in asyncio.run(main())[:32] for a in client]
    assert len(results) == 128
    wrong = [r for r in results if r[0] != 200 or r[1] != r[2]]
    assert not wrong, wrong[:3]
    print(f"128 requests from 32 clients in {time.monotonic() - start:.1f} s")


def test_the_command_serves_a_checkpoint(checkpoint):
    """python -m molmo_jax.serve on the tiny HF folder: up, answering, and stopped by SIGTERM."""
    import subprocess
    import sys
    port = socket_free_port()
    process = subprocess.Popen([sys.executable, "-m", "molmo_jax.serve", "--checkpoint", str(checkpoint), "--port",
                                str(port), "--max-crops", "2", "--max-batch", "2", "--context", "1024"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body("how many dogs are there"),
                       timeout=120)
        assert r.status_code == 200 and r.json()["model"] == checkpoint.name
        assert "molmo-jax" in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM)
    assert process.returncode in (0, -15) and "Application shutdown complete" in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]


def test_help_and_bad_flags():
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--checkpoint", "x", "--max-body-mb", "0"])
    assert "--max-body-mb must be positive" in str(e.value)
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--checkpoint", "/nonexistent/checkpoint"])
    assert str(e.value).startswith("error: ")


# ----------------------------------------------------------------------------- bad input, others answered
@contextlib.contextmanager
def good_clients_alongside(url, cases, clients=3):
    """Good requests from `clients` threads while the block runs; afterwards each was answered
    as one at a time."""
    results, stop = [], threading.Event()

    def run(number):
        with httpx.Client(base_url=url, timeout=120) as client:
            i = number
            while not stop.is_set() or i == number:  # at least one request each
                request_body, answer = cases[i % len(cases)]
                r = client.post("/v1/chat/completions", json=request_body)
                results.append((r.status_code, r.json()["choices"][0]["message"]["content"]
                                if r.status_code == 200 else r.text, answer.text))
                i += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert len(results) >= clients and all(r[0] == 200 and r[1] == r[2] for r in results), results


def slow_body(url, declared=1000, seconds=8.0) -> tuple[bytes, float]:
    """Send headers, then the body one byte per second; -> (the response's status line, seconds
    until it came)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=seconds) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n{" % declared)
        s.settimeout(1.0)
        while time.monotonic() - start < seconds:
            try:
                data = s.recv(4096)
                return data.split(b"\r\n")[0], time.monotonic() - start
            except socket.timeout:
                with contextlib.suppress(OSError):
                    s.sendall(b" ")
    return b"", time.monotonic() - start


def test_bad_inputs_are_refused_by_name_while_others_are_answered(url, cases, predictor):
    dead = f"http://127.0.0.1:{socket_free_port()}/x.png"
    long_prompt = " ".join(["a red circle and a blue square"] * 200)
    bad = [
        (body("what", "data:image/png;base64,@@not base64@@"), 400, "bad base64"),
        (body("what", data_url(b"this is a text file, not an image")), 400, "image"),
        (body("what", data_url(png(300, 300))), 413, "--max-pixels"),
        (body("what", dead), 400, "connection_refused"),
        (body(long_prompt), 400, "longer than the context"),
        ({**body("what"), "frequency_penalty": 0.5, "logprobs": True}, 400,
         "unknown fields frequency_penalty, logprobs"),
        ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, 400, "messages[0]: unknown field name"),
        ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}, 400,
         "exactly one user message"),
        (body("what", max_tokens=0), 400, "max_tokens"),
        (body("what", temperature="hot"), 400, "temperature"),
        (body("what", max_tokens=2000), 400, "does not fit"),
    ]
    with good_clients_alongside(url, cases), httpx.Client(base_url=url, timeout=60) as client:
        for request_body, status, words in bad:
            r = client.post("/v1/chat/completions", json=request_body)
            assert r.status_code == status and words in r.json()["error"]["message"], (words, r.status_code, r.text)
        r = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", content=b" " * (LIMITS["max_body_bytes"] + 1))
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]
        status, seconds = slow_body(url)
        assert status == b"HTTP/1.1 408 Request Timeout" and seconds < LIMITS["body_timeout"] + 3, (status, seconds)
        assert client.get("/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def long(url, cases) -> dict:
    """A request body whose greedy answer runs 120 tokens without a stop token."""
    with httpx.Client(base_url=url, timeout=60) as client:
        found = next((b for b, _ in cases if client.post("/v1/chat/completions", json={**b, "max_tokens": 120})
                      .json()["choices"][0]["finish_reason"] == "length"), None)
    assert found is not None, "no prompt runs 120 tokens without a stop token"
    return found


def test_client_disconnecting_mid_stream_frees_its_row(url, cases, long):
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.get("/health").json()["cancelled"]
        with good_clients_alongside(url, cases):
            with client.stream("POST", "/v1/chat/completions", json={**long, "max_tokens": 400, "stream": True}) as s:
                next(s.iter_lines())  # the first event, then the client goes away
        deadline = time.monotonic() + 30
        while client.get("/health").json()["cancelled"] == before:
            assert time.monotonic() < deadline, "the disconnected request kept its row"
            time.sleep(0.2)
        assert client.get("/health").json()["running"] == 0


def test_full_queue_answers_503_with_retry_after(predictor, cases):
    config = ServeConfig(engine=EngineConfig(max_batch=1, context=1024, chunk=4, max_queue=1), **LIMITS)
    request_body = {**cases[1][0], "max_tokens": 40}

    async def main(base):
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=request_body) for _ in range(6)))

    with serving_in_thread(create_app(predictor, config)) as base:
        responses = asyncio.run(main(base))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["Retry-After"] == "1" and "--max-queue" in r.json()["error"]["message"]
                        for r in busy)
    assert all(r.status_code == 200 for r in responses if r.status_code != 503), [r.text for r in responses]


# ----------------------------------------------------------------------------- the page in headless chromium
POINTS = ("(30.0,40.0)", "(70.0,65.0)")  # each one token of the pointing model's tokenizer
POINTER_SERVER = ServeConfig(engine=EngineConfig(max_batch=2, context=1024), **LIMITS)


def pointing_predictor(predictor, folder) -> Predictor:
    """The tiny model rewired to answer every chat prompt with the two points of POINTS: the
    attention and FFN outputs are zeroed, so each position sees only its own token, and the
    embeddings and the LM head make a chain "prompt end" -> point 1 -> point 2 -> EOS."""
    from flax import nnx
    from data_pipelines import tokenizer as tokenizer_lib
    from test_predict import train_tiny_tokenizer
    train_tiny_tokenizer(folder, POINTS)
    tokenizer = tokenizer_lib.load_tokenizer(str(folder / "tokenizer.model"),
                                             pad_to=predictor.model.config.llm.vocab_size)
    chain = [Predictor(predictor.model, tokenizer, predictor.crop).prepare(Request("x"))["input_tokens"][-1],
             *(tokenizer.encode(p)[-1] for p in POINTS), tokenizer.eos_id]
    graphdef, state = nnx.split(predictor.model)
    params = nnx.to_pure_dict(state)
    llm = params["llm"]
    llm["blocks"]["attention"]["o"]["kernel"] = np.zeros_like(llm["blocks"]["attention"]["o"]["kernel"])
    llm["blocks"]["ffn"]["mlp"]["down"]["kernel"] = np.zeros_like(llm["blocks"]["ffn"]["mlp"]["down"]["kernel"])
    llm["ln_f"]["scale"] = np.ones_like(llm["ln_f"]["scale"])
    embedding, head = np.zeros_like(llm["embed"]["embedding"]), np.zeros_like(llm["lm_head"]["kernel"])
    for dim, (token, following) in enumerate(zip(chain, chain[1:])):
        embedding[token, dim] = 1.0
        head[dim, following] = 10.0
    llm["embed"]["embedding"], llm["lm_head"]["kernel"] = embedding, head
    nnx.replace_by_pure_dict(state, params)
    return Predictor(nnx.merge(graphdef, state), tokenizer, predictor.crop)


def test_pointing_answer_in_pixels(predictor, image_path, tmp_path):
    pointer = pointing_predictor(predictor, tmp_path)
    [answer] = pointer.predict([Request("point to the cat", image_path.read_bytes())],
                               GenerationConfig(max_new_tokens=5))
    assert answer.text == "".join(POINTS), answer.text
    width, height = Image.open(image_path).size
    with serving_in_thread(create_app(pointer, POINTER_SERVER)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=body("point to the cat", data_url(image_path.read_bytes())),
                       timeout=60)
    points = r.json()["choices"][0]["message"]["points"]
    assert points == [{"label": "", "points": [[0.3 * width, 0.4 * height], [0.7 * width, 0.65 * height]]}]


class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    NUL-separated JSON messages, chromium reads fd 3 and writes fd 4): no websocket, no driver."""

    def __init__(self, profile, timeout=60.0):
        import os
        import shutil
        import subprocess
        binary = shutil.which("chromium") or "/usr/bin/chromium"
        assert os.path.exists(binary), "chromium not found: apt-get install chromium (.ci/run does in CI)"
        self.log = open(f"{profile}.log", "wb")  # chromium's own messages, kept beside the screenshot
        to_browser, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        args = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=900,800", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser_w}', binary, *args],
            pass_fds=(to_browser, from_browser_w), stdout=subprocess.DEVNULL, stderr=self.log)
        os.close(to_browser)
        os.close(from_browser_w)
        self.timeout, self.next_id, self.buffer = timeout, 0, b""

    def send(self, method, params=None, session=None) -> dict:
        import os
        import select
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    assert "error" not in reply, (method, reply["error"])
                    return reply["result"]
            ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"chromium did not answer {method}"
            chunk = os.read(self.from_browser, 1 << 20)
            assert chunk, f"chromium exited during {method}"
            self.buffer += chunk

    def close(self):
        import os
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001
            self.process.kill()
            self.process.wait(10)
        os.close(self.to_browser)
        os.close(self.from_browser)
        self.log.close()


def test_page_in_headless_chromium_draws_the_points(predictor, image_path, tmp_path):
    """Open the page, upload an image through the file input, pick the pointing preset, ask: the
    streamed answer appears and the points are drawn over the image where they belong."""
    pointer = pointing_predictor(predictor, tmp_path)
    width, height = Image.open(image_path).size
    with serving_in_thread(create_app(pointer, POINTER_SERVER)) as base:
        browser = Chromium(tmp_path / "profile")
        try:
            [page] = [t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page"][:1]
            session = browser.send("Target.attachToTarget",
                                   {"targetId": page["targetId"], "flatten": True})["sessionId"]

            def js(expression):
                return browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                         "awaitPromise": True}, session)["result"].get("value")

            def wait_for(expression, seconds=60):
                deadline = time.monotonic() + seconds
                while not (value := js(expression)):
                    status = js("document.getElementById('status').textContent")
                    assert time.monotonic() < deadline, (expression, status)
                    time.sleep(0.2)
                return value

            browser.send("Page.navigate", {"url": base + "/"}, session)
            wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
            root = browser.send("DOM.getDocument", {}, session)["root"]["nodeId"]
            node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#file"}, session)["nodeId"]
            browser.send("DOM.setFileInputFiles", {"files": [str(image_path)], "nodeId": node}, session)
            wait_for("!document.getElementById('stage').hidden && document.getElementById('image').naturalWidth > 0")
            js("document.querySelector('button[data-prompt]').click();"
               "document.getElementById('prompt').value += 'cat'; document.getElementById('ask').click()")
            circles = wait_for("(() => { const c = document.querySelectorAll('#overlay circle.point');"
                               "return c.length ? Array.from(c, d => [+d.getAttribute('cx'), +d.getAttribute('cy')]) "
                               ": null })()")
            assert circles == [[0.3 * width, 0.4 * height], [0.7 * width, 0.65 * height]]
            assert js("document.getElementById('answer').textContent") == "".join(POINTS)
            assert js("document.getElementById('style').value") == "pointing"
            wait_for("document.getElementById('status').textContent.startsWith('done')")
            shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"])
        finally:
            browser.close()
    (tmp_path / "page.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    dot = np.abs(pixels - np.array([0xff, 0x3b, 0x30])).sum(-1) < 40  # the points' colour
    assert dot.sum() > 20, "no drawn point in the screenshot"
    print(f"screenshot: {tmp_path / 'page.png'}")


def test_answer_past_the_request_timeout_is_504_and_frees_the_row(predictor, long):
    config = ServeConfig(engine=ENGINE, **{**LIMITS, "request_timeout": 0.5})
    with serving_in_thread(create_app(predictor, config)) as base, httpx.Client(base_url=base, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={**long, "max_tokens": 400})
        assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions", json={**long, "max_tokens": 400, "stream": True}) as s:
            events = read_sse(s)
        assert "--request-timeout" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        deadline = time.monotonic() + 30
        while (health := client.get("/health").json())["cancelled"] < 2:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["running"] == 0
