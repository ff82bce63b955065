import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from flopwise.data.tokenizer import EOS_ID
from flopwise.infer.generate import Engine, Sampling
from flopwise.model.llama import Llama, ModelConfig


@pytest.fixture(scope="module")
def engine(bundled):
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     seq_len=128, init_std=0.2)
    model = Llama(mc)
    eng = Engine(model, bundled.tokenizer())
    eng.reference = model  # the training-time module, for comparisons
    return eng


@pytest.fixture(scope="module")
def server(engine):
    import uvicorn

    from flopwise.infer.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", max_queue=64), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_engine_greedy_matches_full_forward_and_batches_agree(engine):
    """The cached decode path equals argmax of a full forward pass; a padded batch equals single prompts."""
    s = Sampling(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompts = [engine.encode_prompt("Once upon a time"), engine.encode_prompt("The dog ran to the big red house")]
    singles = [[int(t[0]) for t in engine.stream_ids([p], s)] for p in prompts]
    for p, out in zip(prompts, singles, strict=True):
        seq = list(p)
        for t in out:
            with torch.no_grad():
                logits = engine.reference(torch.tensor([seq]))[0, -1]
            logits[EOS_ID] = float("-inf")
            assert int(logits.argmax()) == t
            seq.append(t)
    batch = [t.tolist() for t in engine.stream_ids(prompts, s)]
    assert [[row[i] for row in batch] for i in range(2)] == singles
    a = engine.generate(["Once upon a time"], Sampling(max_new_tokens=20, seed=3))
    assert a == engine.generate(["Once upon a time"], Sampling(max_new_tokens=20, seed=3))


def test_compiled_decode_step_matches_eager_reuses_its_cache_and_falls_back(engine, tmp_path, monkeypatch):
    """--compile on: the static-cache step compiled by inductor gives eager's greedy tokens and logits for a
    single prompt, compiles once across calls (a batch decodes eagerly), and a compile that fails decodes
    eagerly with one note; auto follows what this machine measured, timing it once where nothing is recorded."""
    from flopwise.infer.generate import record_speed

    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    notes = []
    compiled = Engine(engine.reference, engine.sp, compile="on", log=notes.append)
    prompts = [engine.encode_prompt("Once upon a time"), engine.encode_prompt("The dog ran to the big red house")]
    s = Sampling(max_new_tokens=16, temperature=0, ignore_eos=True)
    ours = [t.tolist() for t in compiled.stream_ids(prompts[1:], s)]
    assert ours == [t.tolist() for t in engine.stream_ids(prompts[1:], s)] and compiled.compiled, notes
    cache, step = compiled.cache1, compiled._step
    assert [t.tolist() for t in compiled.stream_ids(prompts[1:], s)] == ours  # the same cache and compiled step
    assert compiled.cache1[0][0] is cache[0][0] and compiled._step is step
    batch = [t.tolist() for t in compiled.stream_ids(prompts, s)]  # two rows: eager, no second compile
    assert batch == [t.tolist() for t in engine.stream_ids(prompts, s)] and compiled._step is step
    with torch.inference_mode():
        ids = torch.tensor([prompts[1][:6]])
        for e in (engine, compiled):
            e._forward(ids[:, :5], 0, None)
        eager_logits = engine._decode(ids[:, 5:], 5, None)
        compiled_logits = compiled._decode(ids[:, 5:], 5, None)
    assert compiled._step is step and torch.allclose(eager_logits, compiled_logits, atol=1e-4)
    # auto: nothing recorded yet, so a long-lived command times both once (the compile is cached by now)
    auto = Engine(engine.reference, engine.sp, compile="auto", log=notes.append)
    assert not auto.compiled
    rates = auto.settle_compile(steps=8)
    assert set(rates) == {"eager", "compiled"} and auto.compiled == (rates["compiled"] > 1.05 * rates["eager"])
    assert auto.settle_compile() is None  # recorded: not timed again
    record_speed(auto.speed_key, True, 2 * rates["eager"])
    assert Engine(engine.reference, engine.sp, compile="auto").compiled
    record_speed(auto.speed_key, True, rates["eager"])
    assert not Engine(engine.reference, engine.sp, compile="auto").compiled

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    notes.clear()
    fallback = Engine(engine.reference, engine.sp, compile="on", log=notes.append)
    assert [t.tolist() for t in fallback.stream_ids(prompts[1:], s)] == ours and not fallback.compiled
    assert notes == ["note: the compiled decode step failed (no C++ compiler); decoding eagerly"]


def test_sampling_filters():
    from flopwise.infer.generate import sample_next

    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, Sampling(top_k=2, temperature=1.0), None, g)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample_next(logits, Sampling(top_k=0, top_p=0.5, temperature=1.0), None, g)) for _ in range(200)}
    assert picks == {1}
    hist = torch.tensor([[1]])
    assert int(sample_next(logits, Sampling(temperature=0, repetition_penalty=2.0), hist, None)) == 2
    assert int(sample_next(logits, Sampling(temperature=0), hist, None)) == 1


def test_models_and_completions(server, engine):
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    for path, body in (("completions", {"model": "gpt-4", "prompt": "Hi"}),
                       ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]})):
        r = httpx.post(f"{server}/v1/{path}", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert r.json()["error"]["param"] == "model" and "'tiny'" in r.json()["error"]["message"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "foo": "ignored"}
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["choices"][0]["finish_reason"] in ("stop", "length")
    assert j["usage"]["prompt_tokens"] > 1 and 1 <= j["usage"]["completion_tokens"] <= 8
    assert httpx.post(f"{server}/v1/completions", json=body).json()["choices"][0]["text"] == j["choices"][0]["text"]
    r = httpx.post(f"{server}/v1/completions", json={"prompt": ["A dog", "The big red house"], "n": 2,
                                                     "max_tokens": 3, "seed": 5})
    j = r.json()
    assert r.status_code == 200 and len(j["choices"]) == 4 and [c["index"] for c in j["choices"]] == [0, 1, 2, 3]
    sp = engine.sp
    assert j["usage"]["prompt_tokens"] == 2 + len(sp.encode("A dog")) + len(sp.encode("The big red house"))
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 6, "seed": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def _sse(server, path, body) -> list:
    events = []
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_streaming_matches_non_streaming(server):
    body = {"prompt": "The cat", "max_tokens": 10, "temperature": 0}
    events = _sse(server, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    full = httpx.post(f"{server}/v1/completions", json=body).json()["choices"][0]
    assert text == full["text"] and chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]
    chat = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A story?"}],
            "max_tokens": 10, "temperature": 0}
    events = _sse(server, "/v1/chat/completions", {**chat, "stream": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()
    assert streamed == httpx.post(f"{server}/v1/chat/completions", json=chat).json()["choices"][0]["message"][
        "content"]


def test_the_official_openai_client(server, engine):
    """What users point at the server: openai's own Python client, completions and chat, whole and streamed."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    raw = httpx.post(f"{server}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8,
                                                       "temperature": 0}).json()
    assert c.choices[0].text == raw["choices"][0]["text"] and c.usage.completion_tokens == raw["usage"][
        "completion_tokens"]
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == c.choices[0].text
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A story?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    parts = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts).strip() == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="model_not_found|'tiny'"):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=-1)


def test_sixteen_concurrent_clients(server):
    def one(i):
        if i % 2:
            r = httpx.post(f"{server}/v1/completions", json={"prompt": f"Story {i}", "max_tokens": 12, "seed": i,
                                                             "temperature": 0.8}, timeout=120)
            return r.status_code, r.json()["choices"][0]["text"]
        events = _sse(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Hi {i}"}],
                                                       "max_tokens": 12, "stream": True, "seed": i})
        return 200 if events[-1] == "[DONE]" else 0, events

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(code == 200 for code, _ in results)
    # the same seeded request alone gives the same text: concurrent requests did not disturb each other
    alone = httpx.post(f"{server}/v1/completions", json={"prompt": "Story 3", "max_tokens": 12, "seed": 3,
                                                         "temperature": 0.8}).json()["choices"][0]["text"]
    assert alone == results[3][1]


def test_concurrent_greedy_requests_share_batches_and_get_their_solo_text(server, engine, monkeypatch):
    """Requests that wait while the worker is busy decode as one batch; each still gets exactly the text it
    gets alone (its own budget and stop strings); seeded sampled requests never share a batch."""
    bodies = [{"prompt": f"The {w} went to", "max_tokens": 4 + 3 * i, "temperature": 0,
               **({"stop": ["e"]} if i % 3 == 0 else {})} for i, w in enumerate(["cat", "little dog", "sun", "boy",
                                                                                 "old tree", "girl", "red ball"])]
    solo = [httpx.post(f"{server}/v1/completions", json=b, timeout=120).json()["choices"][0] for b in bodies]
    sizes = []
    real = engine.stream_texts

    def spy(prompts, samplings):
        sizes.append((len(prompts), [x.seed for x in samplings]))
        time.sleep(0.2)  # keep the worker busy while the other requests arrive
        yield from real(prompts, samplings)

    monkeypatch.setattr(engine, "stream_texts", spy)
    seeded = [{"prompt": "Story", "max_tokens": 5, "temperature": 0.8, "seed": k} for k in range(3)]
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda b: httpx.post(f"{server}/v1/completions", json=b, timeout=120).json(),
                            bodies + seeded))
    assert [g["choices"][0] for g in got[:len(bodies)]] == solo
    assert max(n for n, _ in sizes) > 1, sizes  # some requests did share a step
    assert all(n == 1 for n, seeds in sizes if any(x is not None for x in seeds)), sizes


def test_a_client_that_leaves_stops_its_decoding(server, engine, monkeypatch):
    produced, closed = [], threading.Event()
    real = engine.stream_texts

    def slow(prompts, samplings):
        try:
            for event in real(prompts, samplings):
                produced.append(event)
                time.sleep(0.01)
                yield event
        finally:
            closed.set()

    monkeypatch.setattr(engine, "stream_texts", slow)
    body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # the client hangs up after a few tokens
    assert closed.wait(10) and len(produced) < 60, len(produced)


@pytest.mark.parametrize("body,needle", [
    ('{"prompt": ', "parse the JSON"),
    ('{"prompt": "hi", "max_tokens": 100000}', "maximum context length is 128"),
    ('{"prompt": ""}', "non-empty"),
    ('{"prompt": "hi", "temperature": "hot"}', "temperature"),
    ('{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),
    ('{"prompt": "hi", "top_p": 0}', "top_p"),
    ('{"max_tokens": 5}', "prompt"),
    ('[1, 2]', "body"),
    ('{"prompt": "hi", "max_tokens": -1}', "max_tokens"),
    ('{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "hi", "temperature": -0.5}', "temperature"),
    ('{"prompt": "hi", "top_p": 1.5}', "top_p"),
    ('{"prompt": "hi", "stop": 5}', "stop"),
    ('{"prompt": "hi", "stream": "yes"}', "stream"),
    ('{"prompt": 42}', "prompt"),
    ('{"prompt": "hi", "seed": "x"}', "seed"),
    ('"just a string"', "body"),
    ('', "body"),
])
def test_bad_requests_get_openai_400s_and_the_server_survives(server, body, needle):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    bad_chat = [{"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": "  "}]},
                {"messages": [{"role": "assistant", "content": "x"}]}]
    for b in bad_chat:
        r = httpx.post(f"{server}/v1/chat/completions", json=b)
        assert r.status_code == 400, (b, r.text)
    assert httpx.get(f"{server}/v1/models").status_code == 200


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.03), ("int8", 0.1)])
def test_bf16_and_int8_runtimes_stay_close_to_fp32(engine, bundled, dtype, tol):
    eng = Engine(engine.reference, bundled.tokenizer(), dtype)
    ids = torch.tensor([engine.encode_prompt("Once upon a time, there was a little dog named Max.")])
    want = engine._forward(ids, 0, None)
    got = eng._forward(ids, 0, None).float()
    assert (got - want).norm() / want.norm() < tol
    assert len(eng.generate(["Once upon a time"], Sampling(max_new_tokens=5, seed=0))) == 1
    b = eng.bench(prompt_tokens=8, new_tokens=8)
    assert (b["new_tokens"], b["batch"], b["dtype"]) == (8, 1, dtype)  # the whole budget, ignoring eos


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_flopwise_serve_answers_and_stops_on_ctrl_c(bundled, tmp_path, stop):
    """The CLI server: HTTP on a thread, decoding on the main one; a request is answered, and Ctrl-C or SIGTERM
    ends it cleanly."""
    import signal
    import subprocess
    import sys

    from flopwise.config import TrainConfig
    from flopwise.run import new_run

    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                     seq_len=64)
    run = new_run(tmp_path / "run", mc, TrainConfig(n_tokens=64 * 64, batch_tokens=64 * 8), bundled)
    (run / "ckpt").mkdir()
    torch.save({"model": Llama(mc).state_dict()}, run / "ckpt" / "latest.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flopwise", "serve", str(run), "--port", str(port), "--compile",
                             "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Once", "max_tokens": 5,
                                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(getattr(signal, stop))
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()

