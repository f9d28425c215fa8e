"""`mmedge serve`: the OpenAI chat-completions API, tested with the openai client and with plain HTTP.

A real uvicorn server on the loopback address serves two demo packages (shapes-smolvlm, which has a chat template,
and shapes-paligemma, which takes its prompt in a fixed format); answers are compared with the same packages'
Pipelines called directly.
"""

from __future__ import annotations

import base64
import io
import json
import os
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli
from mmedge.runtimes import Pipeline
from mmedge.tasks import shapes

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
CHAT, FIXED = "shapes-smolvlm", "shapes-paligemma"


def data_uri(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user(image, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def packages(demo_packages):
    return {CHAT: demo_packages(CHAT)[0], FIXED: demo_packages(FIXED)[0]}  # fp32 onnxruntime, shared


@pytest.fixture(scope="module")
def server(packages):
    """A uvicorn server in a thread, on a free loopback port: (base URL, log records)."""
    from mmedge.serve import ServeConfig, create_app

    app = create_app({name: Pipeline.load(path) for name, path in packages.items()},
                     ServeConfig(api_key=KEY, max_image_mb=1, max_queue=16))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    for name in ("uvicorn", "uvicorn.error", "mmedge"):
        logging.getLogger(name).addHandler(handler)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", records
    srv.should_exit = True
    thread.join(10)
    for name in ("uvicorn", "uvicorn.error", "mmedge"):
        logging.getLogger(name).removeHandler(handler)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def questions():
    return list(shapes.examples(8, seed=4242))


@pytest.fixture(scope="module")
def direct(packages):
    return {name: Pipeline.load(path) for name, path in packages.items()}


def test_models_and_health(server, client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {CHAT, FIXED}
    assert listed[CHAT].model_dump()["chat"] is True and listed[FIXED].model_dump()["chat"] is False
    health = httpx.get(server[0] + "/health").json()  # no key needed
    assert health["status"] == "ok" and set(health["models"]) == {CHAT, FIXED}


def test_eight_concurrent_clients_each_get_their_answer(server, client, questions, direct):
    """8 clients at once, each its own image and question, on both packages: every answer is the one the package's
    Pipeline gives called directly, and the demo's answers are right (it scores 97% held-out)."""

    def ask(args):
        model, ex = args
        reply = client.chat.completions.create(model=model, messages=[user(ex.image, ex.prompt)], max_tokens=24)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    jobs = [(CHAT, ex) for ex in questions] + [(FIXED, ex) for ex in questions]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    right = 0
    for (model, ex), (text, finish) in zip(jobs, answers):
        expected = (direct[model].chat().ask(ex.image, ex.prompt, max_new_tokens=24) if model == CHAT
                    else direct[model].generate(ex.image, ex.prompt, max_new_tokens=24))
        assert text == expected, (model, ex.prompt)
        assert finish == "stop"
        right += shapes.normalize(text) == shapes.normalize(ex.answer)
    assert right >= len(jobs) - 1, f"{right} of {len(jobs)} right"


def test_streaming_gives_the_same_answer_in_pieces(client, questions):
    ex = questions[0]
    whole = client.chat.completions.create(model=CHAT, messages=[user(ex.image, "caption")])
    chunks = list(client.chat.completions.create(model=CHAT, messages=[user(ex.image, "caption")], stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_resent_conversation_is_not_computed_again(client, questions, packages):
    """A client sends the whole history with each question: the second request finds the first turn in the KV
    cache, and answers as a chat on one Pipeline does."""
    ex = questions[1]
    first = client.chat.completions.create(model=CHAT, messages=[user(ex.image, "caption")])
    answer = first.choices[0].message.content
    history = [user(ex.image, "caption"), {"role": "assistant", "content": answer},
               {"role": "user", "content": "how many circles?"}]
    second = client.chat.completions.create(model=CHAT, messages=history)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2, second.usage

    chat = Pipeline.load(packages[CHAT]).chat()
    assert chat.ask(ex.image, "caption") == answer
    assert chat.ask(None, "how many circles?") == second.choices[0].message.content


def test_sampling_options_are_applied(client, questions):
    ex = questions[2]
    kw = dict(model=CHAT, messages=[user(ex.image, "caption")], temperature=1.5, top_p=0.9, max_tokens=6)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b  # the seed makes sampling repeatable
    cut = client.chat.completions.create(model=CHAT, messages=[user(ex.image, "caption")], max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1


def _post(server, body, key=KEY, raw: bytes | None = None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is None:
        raw = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    return httpx.post(server[0] + "/v1/chat/completions", content=raw, headers=h, timeout=60)


def test_bad_requests_are_http_errors_and_the_server_keeps_serving(server, client, questions):
    ex = questions[3]
    good = {"model": CHAT, "messages": [user(ex.image, ex.prompt)]}
    text_part = {"type": "text", "text": "caption"}
    cases = {
        "malformed JSON": (400, dict(raw=b'{"model": "x", "messages": [')),
        "not an object": (400, dict(raw=b"[1, 2]")),
        # valid JSON that Python's parser refuses (a 500 and a traceback in the log before)
        "a 5000-digit number": (400, dict(raw=b'{"model": "x", "max_tokens": ' + b"9" * 5000 + b"}")),
        "nesting 100,000 deep": (400, dict(raw=b'{"model": "x", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        "a 100,000-character role, echoed": (400, dict(body={"model": CHAT, "messages": [
            {"role": "x" * 100_000, "content": "hi"}]})),
        "no messages": (400, dict(body={"model": CHAT, "messages": []})),
        "bad role": (400, dict(body={"model": CHAT, "messages": [{"role": "robot", "content": "hi"}]})),
        "bad base64": (400, dict(body={"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@notbase64"}}, text_part]}]})),
        "not an image": (400, dict(body={"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(b"hello, I am text").decode()}}, text_part]}]})),
        "a URL": (400, dict(body={"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text_part]}]})),
        "a local path (off by default)": (400, dict(body={"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}, text_part]}]})),
        "image over --max-image-mb": (413, dict(body={"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (2 << 20)}}, text_part]}]})),
        "body over the limit": (413, dict(raw=b"x" * (13 << 20))),
        "unknown model": (404, dict(body={**good, "model": "nope"})),
        "too many tokens": (400, dict(body={**good, "max_tokens": 100_000})),
        "bad temperature": (400, dict(body={**good, "temperature": "hot"})),
        "n > 1": (400, dict(body={**good, "n": 3})),
        "a fixed-format package given a conversation": (400, dict(body={"model": FIXED, "messages": [
            {"role": "system", "content": "be brief"}, user(ex.image, "caption")]})),
        "wrong API key": (401, dict(body=good, key="wrong")),
        "no API key": (401, dict(body=good, key=None)),
    }
    for what, (status, kw) in cases.items():
        r = _post(server, kw.get("body"), key=kw.get("key", KEY), raw=kw.get("raw"))
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], (what, err)
        assert len(err["message"]) <= 400, (what, len(err["message"]))
    assert httpx.get(server[0] + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    r = httpx.get(server[0] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert (r.status_code, r.headers.get("allow"), r.json()["error"]["code"]) == (405, "POST", "method_not_allowed")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()

    # still serving, and nothing in the log is a traceback; a data URI's scheme and base64 token in any case
    message = user(ex.image, ex.prompt)
    url = message["content"][0]["image_url"]
    url["url"] = url["url"].replace("data:", "DATA:").replace(";base64,", ";Base64,")
    r = _post(server, {**good, "messages": [message]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert not [rec for rec in server[1] if rec.exc_info or "Traceback" in rec.getMessage()]


def test_queue_admits_up_to_its_bound(packages):
    from mmedge.serve import ServeError, Served

    s = Served("m", pipe=None)
    for _ in range(3):
        s.admit(max_queue=2)  # one running, two waiting
    with pytest.raises(ServeError) as caught:
        s.admit(max_queue=2)
    assert caught.value.status == 429
    s.done()
    s.admit(max_queue=2)


def test_cli_bad_package_is_one_line_and_status_2(tmp_path):
    result = run_cli("serve", str(tmp_path / "missing.pkg"), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "mmedge: error:" in result.stderr


def test_ray_serve_two_replicas_answer_concurrent_clients(packages, questions, direct):
    """The same app on a local Ray instance (loopback only): two replicas, each with its own Pipeline, behind Ray's
    proxy; 8 concurrent clients each get the answer the package gives directly, and both replicas serve."""
    ray = pytest.importorskip("ray")
    from ray import serve as ray_serve

    from mmedge.serve import ServeConfig, ray_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(ray_app({CHAT: packages[CHAT]}, ServeConfig(), replicas=2, cpus_per_replica=0.5, threads=1),
                      name="mmedge", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120)

        def ask(ex):
            reply = client.chat.completions.create(model=CHAT, messages=[user(ex.image, ex.prompt)], max_tokens=24)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, questions))
        for ex, text in zip(questions, answers):
            assert text == direct[CHAT].chat().ask(ex.image, ex.prompt, max_new_tokens=24), ex.prompt
        processes = {httpx.get(base + "/health").json()["process"] for _ in range(40)}
        assert len(processes) == 2, processes
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def test_client_example_streams_and_follows_up(server, questions, direct, tmp_path, capsys):
    """examples/client.py against the live server: the answer and the follow-up, the follow-up's history cached."""
    from test_examples import example

    ex = questions[4]
    image = tmp_path / "scene.png"
    ex.image.save(image)
    code = example("client.py").main(["--base-url", server[0] + "/v1", "--api-key", KEY, "--model", CHAT,
                                      "--image", str(image), "--question", "caption", "--follow-up", "how many circles?"])
    out, err = capsys.readouterr()
    assert code == 0
    chat = direct[CHAT].chat()
    assert out == chat.ask(image, "caption") + chat.ask(None, "how many circles?")
    cached = [int(n) for n in re.findall(r"(\d+) of them cached", err)]
    assert len(cached) == 2 and cached[1] > 0, err


def test_a_request_past_its_timeout_is_504_and_the_next_is_served(direct, questions):
    from fastapi.testclient import TestClient

    from mmedge.serve import ServeConfig, create_app

    ex = questions[5]
    body = {"model": CHAT, "messages": [user(ex.image, "caption")]}
    late = TestClient(create_app({CHAT: direct[CHAT]}, ServeConfig(timeout=1e-6)))
    r = late.post("/v1/chat/completions", json=body)
    assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
    # what is wrong with a request short of the model is found before it queues: a 400, not the queue's 504
    bad = {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "x"}]}]}
    r = late.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"], r.text
    r = TestClient(create_app({CHAT: direct[CHAT]}, ServeConfig(timeout=60))).post("/v1/chat/completions", json=body)
    assert r.status_code == 200


def test_local_files_that_are_not_images_or_not_text_are_400s(direct, tmp_path):
    """--allow-local-files: a FIFO (whose read would never end: the worker hung and every later request was a 504)
    and a path with an unpaired surrogate (its error could not be written as JSON: a 500) are plain 400s."""
    from fastapi.testclient import TestClient

    from mmedge.serve import ServeConfig, create_app

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    app = TestClient(create_app({CHAT: direct[CHAT]}, ServeConfig(allow_local_files=True, timeout=30)))
    for url, needle in ((str(fifo), "not an image file"), (str(tmp_path / "\udcff.png"), "not found")):
        body = {"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "caption"}]}]}
        r = app.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
