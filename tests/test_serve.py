import copy
import json
import os
import platform
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from flopwise.data.tokenizer import EOS_ID
from flopwise.infer.generate import Engine, Sampling
from flopwise.model.llama import Llama, ModelConfig

NEEDS_CC = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler")


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


@NEEDS_CC
def test_c_step_matches_torch_for_single_and_padded_batches_and_reuses_its_cache(engine):
    """The C decode step (the default) gives PyTorch's greedy tokens and logits, for one prompt and for a
    left-padded batch (its key mask); it decodes into the cache the prefill wrote and is pointed at a new one
    only when a larger batch grows it."""
    torch_only = Engine(engine.reference, engine.sp, compile="off")
    assert engine.native is not None and engine.compiled and torch_only.native is None
    s = Sampling(max_new_tokens=24, temperature=0, ignore_eos=True)
    prompts = [engine.encode_prompt("Once upon a time"), engine.encode_prompt("The dog ran to the big red house")]
    for batch in (prompts[:1], prompts, prompts[1:]):
        want = [t.tolist() for t in torch_only.stream_ids(batch, s)]
        assert [t.tolist() for t in engine.stream_ids(batch, s)] == want
    cache = engine.cache
    assert engine.native.cache is cache and cache[0][0].shape[0] == 2  # grown once, for the batch of two
    ids = torch.tensor([prompts[1][:9], prompts[1][:9]])
    mask = torch.ones(2, engine.config.seq_len, dtype=torch.bool)
    mask[1, :3] = False  # the second row's first three keys are padding
    for e in (engine, torch_only):
        e._forward(ids[:, :8], 0, mask[:, :8])
    with torch.inference_mode():
        theirs, ours = torch_only._decode(ids[:, 8:], 8, mask), engine._decode(ids[:, 8:], 8, mask)
    assert ours.shape == (2, engine.config.vocab_size)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5) and not torch.allclose(ours[0], ours[1])
    assert engine.cache is cache and engine.native.cache is cache
    with pytest.raises(ValueError, match="refused"):  # a position past the context: refused, not written
        engine.native(ids[:1, 8:], engine.config.seq_len, None)


def _dequantized(model, quantized):
    """``model`` with each linear layer's weights replaced by what the int8 engine holds, dequantized."""
    from flopwise.infer.generate import DecodeModel

    ref = DecodeModel(copy.deepcopy(model).eval()).eval()
    mods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(mods[name].weight().dequantize())
    return ref


def _odd(engine):
    """A model whose widths (80, 200: not multiples of 16 or 64) run every SIMD loop's tail."""
    torch.manual_seed(1)
    return Llama(ModelConfig(vocab_size=engine.config.vocab_size, d_model=80, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=200, seq_len=64, init_std=0.2))


def _int8_reference(model, quantized, ids, rounds: bool) -> torch.Tensor:
    """The last position's logits of a full causal forward of ``model`` with the int8 engine's weights dequantized,
    in fp32; ``rounds``: each linear layer's input rounded per row to 8-bit steps of max|x| / 127, as the C step's
    integer (VNNI) kernel does."""
    from flopwise.infer.generate import _rms
    from flopwise.model.llama import apply_rope

    ref = _dequantized(model, quantized)

    def lin(layer, x):
        if rounds:
            amax = x.abs().amax(-1, keepdim=True)
            inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
            x = torch.round(x * inv) * (amax / 127.0)
        return layer(x)

    x, pos = ref.embed(ids), ids.shape[1]
    cos, sin = ref.rope_cos[:pos], ref.rope_sin[:pos]
    for layer in ref.layers:
        hd, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
        qkv = lin(layer.qkv, _rms(x, layer.attn_norm)).view(1, pos, nh + 2 * nkv, hd).transpose(1, 2)
        qk = apply_rope(qkv[:, :nh + nkv], cos, sin)
        y = torch.nn.functional.scaled_dot_product_attention(qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:],
                                                             is_causal=True, enable_gqa=nkv != nh)
        x = x + lin(layer.wo, y.transpose(1, 2).reshape(1, pos, -1))
        gu = lin(layer.gate_up, _rms(x, layer.mlp_norm))
        x = x + lin(layer.w_down, torch.nn.functional.silu(gu[..., :layer.d_ff]) * gu[..., layer.d_ff:])
    return lin(ref.head, _rms(x[:, -1], ref.norm))


X86 = platform.machine() in ("x86_64", "AMD64")
BUILDS = {"default": (), "no-vnni": ("-mno-avx512vnni",), "avx2": ("-mno-avx512f",),
          "plain": ("-mno-avx512f", "-mno-avx2")}


@NEEDS_CC
@pytest.mark.parametrize("shape", ["fixture", "odd"])
@pytest.mark.parametrize("build", list(BUILDS) if X86 else ["default"])
def test_c_step_int8_computes_the_quantized_weights_exactly(engine, shape, build):
    """int8, each build of step.c (AVX-512 with and without VNNI, AVX2, plain C; the odd shape runs every SIMD
    loop's tail): the logits are those of the int8 weights, dequantized, in fp32 arithmetic, with the activations
    rounded to 8 bits exactly where the build's kernel is the integer one. (PyTorch's int8 rounds activations
    per tensor, so it is only close: test_bf16_and_int8_runtimes_stay_close_to_fp32.)"""
    from flopwise.infer.native import NativeStep, library

    model = engine.reference if shape == "fixture" else _odd(engine)
    eng = Engine(model, engine.sp, dtype="int8")
    assert eng.native is not None
    lib = library(BUILDS[build])
    if build == "default" and X86 and Path("/proc/cpuinfo").exists():  # VNNI is used exactly where the CPU has it
        assert bool(lib.fw_build() & 8) == ("avx512_vnni" in Path("/proc/cpuinfo").read_text())
    if build == "avx2":
        assert lib.fw_build() & 14 == 2
    if build == "plain":
        assert lib.fw_build() & 14 == 0
    if build == "no-vnni":
        assert lib.fw_build() & 8 == 0 and (lib.fw_build() & 4 or "avx512f" not in Path("/proc/cpuinfo").read_text())
    step = NativeStep(eng.model, lib=lib)
    ids = torch.tensor([engine.encode_prompt("Once upon a time there was")])
    with torch.inference_mode():
        step.bind(eng._cache(1))
        for pos in range(ids.shape[1]):  # every key from the C step (PyTorch's int8 prefill rounds differently)
            ours = step(ids[:, pos:pos + 1], pos, None)
        rounds = bool(lib.fw_build() & 8)
        want = _int8_reference(model, eng.model, ids, rounds=rounds)
        other = _int8_reference(model, eng.model, ids, rounds=not rounds)
    error, other_error = ((x - ours).norm() / x.norm() for x in (want, other))
    if rounds:
        # the reference rounds inputs that PyTorch computed, which can differ from C's in the last bit: a value at a
        # rounding tie may land one step apart, so the bound is relative, yet far below what not rounding costs
        assert error < 2e-3 and other_error > 5 * error, (error, other_error)
    else:
        assert torch.allclose(ours, want, atol=1e-4, rtol=1e-4), (ours - want).abs().max()


@NEEDS_CC
@pytest.mark.skipif(not X86, reason="the SIMD variants are x86's")
@pytest.mark.parametrize("flags,kernel", [(("-mno-avx512f",), 2), (("-mno-avx512f", "-mno-avx2"), 0)])
def test_c_step_fp32_variants_without_avx512_agree(engine, flags, kernel):
    """The AVX2 and plain-C builds of step.c (what machines without AVX-512 compile) give the default build's fp32
    logits, on widths that run every loop's tail."""
    from flopwise.infer.native import NativeStep, library

    variant = library(flags)
    assert variant.fw_build() & 14 == kernel  # the build this test means to check is the one built
    eng = Engine(_odd(engine), engine.sp)
    ids = torch.tensor([engine.encode_prompt("Once upon a time there was")])
    outs = []
    for step in (eng.native, NativeStep(eng.model, lib=variant)):
        with torch.inference_mode():
            eng._forward(ids[:, :-1], 0, None)
            step.bind(eng.cache)
            outs.append(step(ids[:, -1:], ids.shape[1] - 1, None))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_without_a_c_compiler_decoding_falls_back_to_torch(engine, tmp_path, monkeypatch):
    """No compiler, or one that fails: one note, PyTorch decodes the same tokens, no half-built library left."""
    from flopwise.infer import native

    s = Sampling(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = [t.tolist() for t in engine.stream_ids([engine.encode_prompt("Once upon a time")], s)]
    monkeypatch.setattr(native.library, "lib", None)
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cc").symlink_to(shutil.which("false"))  # a compiler that fails every build
    not_a_folder = tmp_path / "a-file"  # a cache path that cannot be written (as any user, root included)
    not_a_folder.write_text("")
    for path, why in ((str(tmp_path / "empty"), "no C compiler"), (str(tmp_path / "bin"), "could not build"),
                      (os.environ["PATH"], "the C decode step: [Errno 20] Not a directory")):
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", path)
        monkeypatch.setattr(native.library, "failed", None)
        if "Errno" in why:  # a cache folder it cannot write: also one note
            monkeypatch.setenv("FLOPWISE_CACHE", str(not_a_folder))
        notes = []
        eng = Engine(engine.reference, engine.sp, log=notes.append)
        assert eng.native is None and not eng.compiled and len(notes) == 1 and why in notes[0], notes
        assert notes[0].endswith("; decoding with PyTorch (slower)")
        assert [t.tolist() for t in eng.stream_ids([engine.encode_prompt("Once upon a time")], s)] == want
        again = []  # the failure is remembered in the process: the same note, nothing built again
        Engine(engine.reference, engine.sp, log=again.append)
        assert again == notes
    # each failed build's temporary file removed (the builds' lock file stays, as any lock file does)
    assert [p.name for p in (tmp_path / "native").iterdir() if p.suffix != ".lock"] == []
    notes = []
    Engine(engine.reference, engine.sp, dtype="bf16", compile="on", log=notes.append)
    assert notes == ["note: the C decode step reads fp32 or int8 weights; bf16 decodes with PyTorch"]


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
    with torch.inference_mode():  # a decode step too (int8: the C step's, its activations in 8 bits with VNNI)
        for e in (engine, eng):
            e._forward(ids[:, :-1], 0, None)
        last = ids.shape[1] - 1
        want, got = engine._decode(ids[:, last:], last, None), eng._decode(ids[:, last:], last, None)
    assert (got.float() - want).norm() / want.norm() < tol
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

