import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flopwise.config import TrainConfig
from flopwise.errors import FlopwiseError
from flopwise.infer.export import export_gguf, export_hf, permute_for_llama_cpp
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import load_model, new_run

transformers = pytest.importorskip("transformers")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flopwise", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def make_run(bundled, path: Path, n_kv_heads=4, tie=True, d_ff=96, seed=0) -> Path:
    """A run directory holding a randomly initialised model (large init so logits are far from zero)."""
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                     d_ff=d_ff, seq_len=64, tie_embeddings=tie, init_std=0.25, norm_eps=1e-6, rope_theta=500.0)
    run = new_run(path, mc, TrainConfig(n_tokens=64 * 64, batch_tokens=64 * 8), bundled)
    torch.manual_seed(seed)
    model = Llama(mc)
    with torch.no_grad():  # norm gains away from one, so a wrong norm placement shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    (run / "ckpt").mkdir()
    torch.save({"model": model.state_dict()}, run / "ckpt" / "latest.pt")
    return run


def sample_texts(n=300) -> list[str]:
    rng = random.Random(0)
    from flopwise.data.prepare import bundled_corpus

    stories = bundled_corpus()[1].read_text().split("\n\n")
    texts = ["", " ", "  two  spaces", " lead", "trail ", "line\nbreak\n\n### Response:\n", "tab\there",
             "héllo wörld ✓ 日本語 🙂", "Ünïcödé", "3.14159 and 2026!"]
    texts += [s[:rng.randint(1, 200)] for s in stories[:n // 2]]
    texts += ["".join(chr(rng.randint(32, 0x30FF)) for _ in range(rng.randint(1, 30))) for _ in range(n // 3)]
    return texts


@pytest.mark.parametrize("n_kv_heads,tie", [(4, True), (4, False), (2, True), (1, False)])
def test_hf_export_loads_in_transformers_with_matching_logits(bundled, tmp_path, n_kv_heads, tie):
    run = make_run(bundled, tmp_path / "run", n_kv_heads, tie)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tie
    ours = load_model(run)
    x = torch.randint(0, bundled.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert a.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (a - b).abs().max() < 1e-4


def test_hf_tokenizer_and_chat_template_match_flopwise(bundled, tmp_path):
    run = make_run(bundled, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = {"kind": "instructions"}  # present it as a tuned run: the chat template is written
    (run / "config.json").write_text(json.dumps(cfg))
    out = export_hf(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = bundled.tokenizer()
    bad = [t for t in sample_texts() if tok(t)["input_ids"] != [1] + sp.encode(t)]
    assert not bad, f"{len(bad)} strings tokenize differently, e.g. {bad[:3]!r}"
    ids = [1] + sp.encode("héllo  wörld 🙂")
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])
    from flopwise.data.instructions import chat_prompt_ids

    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once, a cat."},
            {"role": "user", "content": "Another one."}]
    templ = tok.apply_chat_template(msgs, tokenize=False)
    assert "### Instruction:\nTell me a story.\n\n### Response:\n Once, a cat.</s>" in templ
    assert templ.endswith("\n\n### Instruction:\nAnother one.\n\n### Response:\n")
    # the template tokenizes to exactly the ids flopwise tuned on and serves with
    chats = [msgs, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there\n"}],
             msgs + [{"role": "assistant", "content": " spaced  reply "}, {"role": "user", "content": "ünïcode 🙂"}]]
    for chat in chats:
        assert tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"] == \
            chat_prompt_ids(sp, chat)


@pytest.mark.parametrize("n_kv_heads,tie", [(4, True), (2, False)])
def test_gguf_f32_loads_back_into_transformers_with_matching_logits(bundled, tmp_path, n_kv_heads, tie):
    run = make_run(bundled, tmp_path / "run", n_kv_heads, tie)
    info = export_gguf(run, tmp_path / "gg" / "model.gguf", "f32", log=lambda m: None)
    assert info["bits_per_weight"] > 32 and "\nFROM ./model.gguf\n" in (tmp_path / "gg" / "Modelfile").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gg", gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    ours = load_model(run)
    x = torch.randint(0, bundled.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "gg", gguf_file="model.gguf")
    sp = bundled.tokenizer()
    texts = [t for t in sample_texts(60) if t.strip()]
    same = sum(tok(t)["input_ids"] == [1] + sp.encode(t) for t in texts)
    assert same >= 0.9 * len(texts)  # transformers' own GGUF tokenizer conversion; llama.cpp is checked exactly


def test_gguf_permutation_turns_half_rotation_into_pair_rotation():
    """llama.cpp rotates adjacent pairs; after the permutation that equals our half rotation."""
    from flopwise.model.llama import apply_rope, rope_tables

    hd, heads = 8, 2
    w = torch.randn(heads * hd, 16)
    x = torch.randn(1, 16)
    cos, sin = rope_tables(hd, 4, 10000.0)
    q = (x @ w.t()).view(1, 1, heads, hd).transpose(1, 2)  # (B, H, T, hd)
    ours = apply_rope(q, cos[3:4], sin[3:4]).flatten()
    qp = torch.from_numpy(permute_for_llama_cpp(w.numpy(), heads)) @ x.t()
    qp = qp.view(heads, hd // 2, 2)
    theta = 3 * 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    c, s = theta.cos(), theta.sin()
    rot = torch.stack([qp[..., 0] * c - qp[..., 1] * s, qp[..., 0] * s + qp[..., 1] * c], -1)  # pair rotation
    unperm = torch.cat([rot[..., 0], rot[..., 1]], -1).flatten()  # back to half order
    assert torch.allclose(ours, unperm, atol=1e-5)


def test_quantized_gguf_tensor_types_and_sizes(bundled, tmp_path):
    import gguf

    run = make_run(bundled, tmp_path / "run", d_ff=48)  # w_down rows of 48: not a multiple of 32
    sizes = {}
    for quant in ("f16", "q8_0", "q4_0"):
        info = export_gguf(run, tmp_path / quant / "m.gguf", quant, log=lambda m: None)
        sizes[quant] = info["bytes"]
        reader = gguf.GGUFReader(info["path"])
        types = {t.name: t.tensor_type for t in reader.tensors}
        Q = gguf.GGMLQuantizationType
        assert types["blk.0.attn_norm.weight"] == Q.F32 and "output.weight" not in types
        if quant == "f16":
            assert types["blk.0.attn_q.weight"] == Q.F16 and not info["kept_f16"]
            continue
        want = Q.Q8_0 if quant == "q8_0" else Q.Q4_0
        assert types["blk.0.attn_q.weight"] == want and types["blk.1.ffn_up.weight"] == want
        assert types["blk.0.ffn_down.weight"] == Q.F16 and "blk.0.ffn_down.weight" in info["kept_f16"]
        t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
        block_size, type_size = gguf.GGML_QUANT_SIZES[want]
        assert t.n_bytes == 64 * 64 // block_size * type_size  # 34 bytes per 32 weights (q8_0), 18 (q4_0)
        kv = reader.fields
        assert bytes(kv["general.architecture"].parts[-1]).decode() == "llama"
        assert int(kv["llama.attention.head_count_kv"].parts[-1][0]) == 4
        assert float(kv["llama.attention.layer_norm_rms_epsilon"].parts[-1][0]) == pytest.approx(1e-6)
        assert float(kv["llama.rope.freq_base"].parts[-1][0]) == pytest.approx(500.0)
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    # several quantisations into one folder: each keeps a Modelfile that names its own file, and re-exporting
    # one replaces only it (a foreign .gguf there would be refused: tests/test_hostile.py)
    both = tmp_path / "both"
    first = export_gguf(run, both / "m-q8.gguf", "q8_0", log=lambda m: None)
    second = export_gguf(run, both / "m-q4.gguf", "q4_0", log=lambda m: None)
    assert Path(first["modelfile"]).name == "Modelfile" and Path(second["modelfile"]).name == "Modelfile.m-q4"
    assert "FROM ./m-q8.gguf\n" in Path(first["modelfile"]).read_text()
    assert "FROM ./m-q4.gguf\n" in Path(second["modelfile"]).read_text()
    again = export_gguf(run, both / "m-q4.gguf", "q4_0", log=lambda m: None)
    assert again["modelfile"] == second["modelfile"] and len(list(both.iterdir())) == 4


def test_export_bad_input_is_clear_and_leaves_nothing(bundled, tmp_path, monkeypatch):
    run = make_run(bundled, tmp_path / "run")
    (run / "ckpt" / "latest.pt").unlink()
    r = cli("export", run, "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "no checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    run = make_run(bundled, tmp_path / "run2")
    r = cli("export", run, "--format", "gguf", "--quant", "q5_k", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "unknown --quant 'q5_k'" in r.stderr
    r = cli("export", run, "--format", "onnx", "--out", tmp_path / "x")
    assert r.returncode == 2 and "choose hf or gguf" in r.stderr
    cfg = json.loads((run / "config.json").read_text())
    odd = dict(cfg, model=dict(cfg["model"], d_model=36, n_heads=4, n_kv_heads=4))  # head_dim 9
    bad_run = tmp_path / "odd"
    bad_run.mkdir()
    (bad_run / "config.json").write_text(json.dumps(odd))
    with pytest.raises(FlopwiseError, match="head_dim 9 is odd"):
        export_gguf(bad_run, tmp_path / "odd.gguf")
    import flopwise.infer.export as ex

    def boom(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "gguf_tensors", boom)
    with pytest.raises(RuntimeError):
        export_gguf(run, tmp_path / "fail" / "m.gguf")
    assert list((tmp_path / "fail").iterdir()) == []
    monkeypatch.setattr(ex, "hf_state_dict", boom)
    with pytest.raises(RuntimeError):
        export_hf(run, tmp_path / "hf-fail")
    assert not (tmp_path / "hf-fail").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    monkeypatch.undo()
    with pytest.raises(FlopwiseError, match="not an earlier flopwise export"):
        export_hf(run, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a GGUF export never overwrites the user's files: a non-.gguf file as --out, or their own Modelfile
    r = cli("export", run, "--format", "gguf", "--out", tmp_path / "mine" / "notes.txt")
    assert r.returncode == 2 and "is not a .gguf path" in r.stderr
    (tmp_path / "mine" / "Modelfile").write_text("FROM llama3\n")
    r = cli("export", run, "--format", "gguf", "--out", tmp_path / "mine" / "model.gguf")
    assert r.returncode == 2 and "was not written by flopwise" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["Modelfile", "notes.txt"]
    assert (tmp_path / "mine" / "Modelfile").read_text() == "FROM llama3\n"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    out = export_gguf(run, tmp_path / "ours" / "m.gguf", log=lambda m: None)["path"]  # ours: replaced on re-export
    assert export_gguf(run, out, log=lambda m: None)["path"] == out
    umask = os.umask(0)
    os.umask(umask)
    assert (Path(out).stat().st_mode & 0o777) == 0o666 & ~umask  # the user's umask, not mkstemp's 0600


def test_gguf_reads_back_into_flopwise_and_generates(bundled, tmp_path):
    from flopwise.infer.gguf_load import load_gguf

    run = make_run(bundled, tmp_path / "run", n_kv_heads=2, tie=False)
    ours = load_model(run)
    sp = bundled.tokenizer()
    x = torch.randint(0, bundled.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(x)
    for quant in ("f32", "q8_0"):
        path = export_gguf(run, tmp_path / f"{quant}.gguf", quant, log=lambda m: None)["path"]
        model, sp2 = load_gguf(path)
        if quant == "f32":
            with torch.no_grad():
                assert (model(x) - want).abs().max() < 1e-5
        for name, w in ours.state_dict().items():  # q8_0: each weight within half a step of its 32-block's scale
            got = model.state_dict()[name]
            step = w.abs().max() / 127 if quant == "q8_0" and w.dim() == 2 else 1e-6
            assert (got - w).abs().max() <= step * 0.51 + 1e-6, name
        assert all(sp2.encode(t) == sp.encode(t) for t in sample_texts(100))  # the embedded vocabulary
    r = cli("generate", tmp_path / "f32.gguf", "--prompt", "Once upon a time", "--max-tokens", "8", "--seed", "1")
    r2 = cli("generate", run, "--prompt", "Once upon a time", "--max-tokens", "8", "--seed", "1")
    assert r.returncode == 0 and r.stdout == r2.stdout and r.stdout.strip()


llama_cpp = None
try:  # the interop tests need llama-cpp-python (make test-interop builds it)
    import llama_cpp  # noqa: F811
except ImportError:
    pass


@pytest.mark.interop
@pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable (make test-interop)")
@pytest.mark.parametrize("n_kv_heads,tie", [(4, True), (2, False)])
def test_llama_cpp_f32_logits_and_tokens_match(bundled, tmp_path, n_kv_heads, tie):
    run = make_run(bundled, tmp_path / "run", n_kv_heads, tie)
    path = export_gguf(run, tmp_path / "m.gguf", "f32", log=lambda m: None)["path"]
    llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    sp = bundled.tokenizer()
    for t in sample_texts(200):
        assert llm.tokenize(t.encode(), add_bos=True, special=False) == [1] + sp.encode(t), t
    ids = [1] + sp.encode("Once upon a time, there was a little cat named Tom.")
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = load_model(run)(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3


@pytest.mark.interop
@pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable (make test-interop)")
def test_llama_cpp_q8_0_argmax_agrees_on_a_trained_model(bundled, tmp_path):
    from flopwise.training.trainer import train

    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                     seq_len=128)
    run = new_run(tmp_path / "run", mc, TrainConfig(n_tokens=128 * 16 * 150, batch_tokens=128 * 16), bundled)
    train(run, quiet=True)
    sp = bundled.tokenizer()
    from flopwise.data.prepare import bundled_corpus

    text = bundled_corpus()[1].read_text()[:4000]
    ids = ([1] + sp.encode(text))[:128]
    with torch.no_grad():
        ours = load_model(run)(torch.tensor([ids]))[0].numpy()
    path = export_gguf(run, tmp_path / "q8.gguf", "q8_0", log=lambda m: None)["path"]
    llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, n_threads=2, use_extra_bufts=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    assert agree > 0.95, agree


def test_llama_cpp_backend_without_llama_cpp_is_one_line(monkeypatch):
    from flopwise.infer.llamacpp import llama_cpp_module

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(FlopwiseError, match=r"--backend llama.cpp needs llama-cpp-python, which is not installed: "
                                            r"pip install 'flopwise\[interop\]'"):
        llama_cpp_module()


@pytest.mark.interop
@pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable (make test-interop)")
def test_llama_cpp_backend_decodes_what_the_native_engine_does(bundled, tmp_path):
    """generate --backend llama.cpp: the same greedy text as flopwise's engine, for a run (exported once to a cached
    GGUF) and for a .gguf file; a batch; the same sampled text for the same seed from the same backend."""
    run = make_run(bundled, tmp_path / "run")
    env = {**os.environ, "FLOPWISE_CACHE": str(tmp_path / "cache")}

    def gen(target, *extra):
        r = subprocess.run([sys.executable, "-m", "flopwise", "generate", str(target), "--prompt", "Once upon a time",
                            "--prompt", "The dog", "--max-tokens", "24", "--temperature", "0", "--json", *extra],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout), r.stderr

    native, _ = gen(run)
    ours, notes = gen(run, "--backend", "llama.cpp")
    assert ours == native and "exporting" in notes
    again, notes = gen(run, "--backend", "llama.cpp")
    assert again == native and "exporting" not in notes and len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    path = export_gguf(run, tmp_path / "m.gguf", "f32", log=lambda m: None)["path"]
    assert gen(path, "--backend", "llama.cpp")[0] == native
    seeded = [gen(run, "--backend", "llama.cpp", "--temperature", "1", "--seed", "3")[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
