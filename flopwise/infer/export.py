"""Export a run to Hugging Face (safetensors) and GGUF (llama.cpp, ollama) files.

Both consumers compute the same function as flopwise's Llama: the same RMSNorm (fp32, eps from
the config), rotate-half RoPE, GQA, SwiGLU, tied or untied head. Hugging Face's LlamaForCausalLM
uses the rotate-half convention too, so its weights are ours renamed. llama.cpp rotates
adjacent pairs (GPT-J style), so the rows of Q and K are permuted within each head: for a head's
rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] it stores [x_0, y_0, x_1, y_1, ...], which turns its
pair rotation into our half rotation (the same permutation llama.cpp's own converter applies).

Every file is written under a temporary name and renamed; a folder export is assembled in a
temporary folder and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from flopwise import __version__
from flopwise.data.instructions import PREAMBLE
from flopwise.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, usual_mode
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import is_tuning, load_model, read_run_config

QUANTS = ("f32", "f16", "q8_0", "q4_0")


def _check_expressible(mc: ModelConfig) -> None:
    if mc.head_dim % 2:
        raise FlopwiseError(f"head_dim {mc.head_dim} is odd: rotary embeddings need an even head size")
    if mc.n_heads % mc.n_kv_heads:
        raise FlopwiseError(f"{mc.n_heads} heads are not a multiple of {mc.n_kv_heads} key/value heads")


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama names (lm_head left out when tied)."""
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "wq": "self_attn.q_proj",
             "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = getattr(layer, ours).weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def hf_config(mc: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": mc.vocab_size,
            "hidden_size": mc.d_model, "intermediate_size": mc.d_ff, "num_hidden_layers": mc.n_layers,
            "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.n_kv_heads, "head_dim": mc.head_dim,
            "max_position_embeddings": mc.seq_len, "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta,
            "rope_scaling": None, "tie_word_embeddings": mc.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": None, "torch_dtype": "float32",
            "use_cache": True, "pretraining_tp": 1, "flopwise_version": __version__}


def bpe_merges(sp) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces, by the piece's rank.

    SentencePiece applies the merge whose result scores highest (BPE scores fall with the id), so
    ordering by the merged piece's id (then the parts' ids) reproduces its choices.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i)
                                                                               or sp.is_byte(i))}
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    return [(m[3], m[4]) for m in sorted(merges)]


def hf_tokenizer_json(sp) -> dict:
    """tokenizer.json (Hugging Face tokenizers) that tokenizes exactly as the SentencePiece model does:
    a '▁' before the text, spaces as '▁' (runs of spaces kept), BPE with byte fallback."""
    specials = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    bos = sp.id_to_piece(BOS_ID)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "},
                                                       "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(UNK_ID),
                  "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {sp.id_to_piece(i): i for i in range(sp.get_piece_size())},
                  "merges": [list(m) for m in bpe_merges(sp)]},
    }


def hf_tokenizer_files(sp, seq_len: int, chat_template: str | None) -> dict[str, str]:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": sp.id_to_piece(BOS_ID),
              "eos_token": sp.id_to_piece(EOS_ID), "unk_token": sp.id_to_piece(UNK_ID), "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": seq_len}
    if chat_template:
        config["chat_template"] = chat_template
    special = {"bos_token": config["bos_token"], "eos_token": config["eos_token"], "unk_token": config["unk_token"]}
    return {"tokenizer.json": json.dumps(hf_tokenizer_json(sp), ensure_ascii=False) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


# Jinja chat template for tuned runs: the Alpaca format that flopwise tunes with. flopwise encodes each prompt and
# each reply separately, so each starts with SentencePiece's dummy-prefix space; the tokenizer prepends one only at
# the start and after a special token (</s>), so a reply (after '### Response:\n') gets its space written out here.
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set sys = namespace(text='" + PREAMBLE + "') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys.text = m['content'] %}{% endif %}{% endfor %}"
    "{% set ns = namespace(first=true) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if ns.first %}{{ sys.text + '\\n\\n' }}{% set ns.first = false %}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    usual_mode(tmp)
    return tmp


def _place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary file or folder into place (replacing an earlier export)."""
    if out.is_dir() and tmp.is_dir():
        if any(out.iterdir()) and not _is_hf_export(out):
            raise FlopwiseError(f"{out} exists and is not an earlier flopwise export: choose an empty or new --out")
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _is_hf_export(path: Path) -> bool:
    try:
        return "flopwise_version" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """A folder that transformers' AutoModelForCausalLM / AutoTokenizer load as LlamaForCausalLM."""
    run_dir, out = Path(run_dir), Path(out)
    mc, _, config = read_run_config(run_dir)
    _check_expressible(mc)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_hf_export(out))):
        raise FlopwiseError(f"{out} exists and is not an earlier flopwise export: choose an empty or new --out")
    model = load_model(run_dir)
    tmp = _staging(out)
    try:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(mc), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_length": mc.seq_len}, indent=2) + "\n")
        shutil.copyfile(run_dir / "tokenizer.model", tmp / "tokenizer.model")
        sp = load_tokenizer(run_dir / "tokenizer.model")
        template = ALPACA_CHAT_TEMPLATE if is_tuning(config) else None
        for name, text in hf_tokenizer_files(sp, mc.seq_len, template).items():
            (tmp / name).write_text(text)
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- GGUF ----

def permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Q or K projection, half-rotation order -> llama.cpp's interleaved pair order, per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


# flopwise block weights -> llama.cpp's tensor names (blk.N.<name>.weight)
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                    "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def gguf_tensors(model: Llama) -> list[tuple[str, np.ndarray]]:
    mc = model.config

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    out = [("token_embd.weight", a(model.embed.weight))]
    for i, layer in enumerate(model.layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            w = a(getattr(layer, ours).weight)
            if ours in ("wq", "wk"):
                w = permute_for_llama_cpp(w, mc.n_heads if ours == "wq" else mc.n_kv_heads)
            out.append((f"blk.{i}.{theirs}.weight", w))
    out.append(("output_norm.weight", a(model.norm.weight)))
    if not mc.tie_embeddings:  # tied: llama.cpp reuses token_embd when output.weight is absent
        out.append(("output.weight", a(model.head.weight)))
    return out


def _vocab(sp) -> tuple[list[bytes], list[float], list[int]]:
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor is stored in: norms (1-D) stay f32; rows not a multiple of the block stay f16."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or quant == "f32":
        return q.F32
    if quant == "f16":
        return q.F16
    qtype = {"q8_0": q.Q8_0, "q4_0": q.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else q.F16


def write_gguf(model: Llama, vocab: tuple[list[bytes], list[float], list[int]], out: Path, quant: str,
               name: str, chat_template: str | None = None) -> tuple[list[str], int]:
    """Write ``model`` with a llama-style vocabulary (tokens, scores, types) to ``out`` atomically.

    Returns the tensors kept at f16 (rows not a multiple of the quant block) and the weight count.
    """
    mc = model.config
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    usual_mode(tmp)
    kept, n_weights = [], 0
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_string(GGUF_MARK_KEY, __version__)  # whose file it is: a later export may replace only ours
        w.add_context_length(mc.seq_len)
        w.add_embedding_length(mc.d_model)
        w.add_block_count(mc.n_layers)
        w.add_feed_forward_length(mc.d_ff)
        w.add_head_count(mc.n_heads)
        w.add_head_count_kv(mc.n_kv_heads)
        w.add_rope_dimension_count(mc.head_dim)
        w.add_rope_freq_base(mc.rope_theta)
        w.add_layer_norm_rms_eps(mc.norm_eps)
        w.add_vocab_size(mc.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, scores, types = vocab
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(UNK_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)
        if chat_template:
            w.add_chat_template(chat_template)
        for tname, arr in gguf_tensors(model):
            n_weights += arr.size
            qt = tensor_type(tname, arr.shape, quant)
            if qt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, arr.astype(np.float32))
            elif qt == gguf.GGMLQuantizationType.F16:
                if quant != "f16":
                    kept.append(tname)
                w.add_tensor(tname, arr.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return kept, n_weights


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f32", log=print) -> dict:
    """A GGUF file for llama.cpp/ollama (plus a Modelfile beside it); returns size and bits per weight."""
    if quant not in QUANTS:
        raise FlopwiseError(f"unknown quant type {quant!r}: choose one of {', '.join(QUANTS)}")
    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir() or (not out.exists() and not out.suffix):
        out = out / "model.gguf"
    elif out.suffix != ".gguf":
        raise FlopwiseError(f"--out {out} is not a .gguf path: give FILE.gguf, or a folder for model.gguf")
    modelfile = out.with_name("Modelfile")
    if modelfile.exists() and not modelfile.read_text(errors="replace").startswith(MODELFILE_MARK):
        raise FlopwiseError(f"{modelfile} exists and was not written by flopwise: export into another folder")
    if out.exists() and not _is_our_gguf(out):
        raise FlopwiseError(f"{out} exists without flopwise's mark (another tool's file, or an export from before "
                            "flopwise marked its files): choose another --out, or delete it first")
    mc, _, config = read_run_config(run_dir)
    _check_expressible(mc)
    model = load_model(run_dir)
    sp = load_tokenizer(run_dir / "tokenizer.model")
    kept, n_weights = write_gguf(model, _vocab(sp), out, quant, run_dir.resolve().name,
                                 ALPACA_CHAT_TEMPLATE if is_tuning(config) else None)
    if kept:
        log(f"note: {len(kept)} tensor(s) whose rows are not a multiple of the {quant} block stay f16: "
            + ", ".join(kept[:6]) + (" …" if len(kept) > 6 else ""))
    size = out.stat().st_size
    modelfile = write_modelfile(out, mc, is_tuning(config))
    return {"path": str(out), "modelfile": str(modelfile), "quant": quant, "bytes": size, "n_weights": int(n_weights),
            "bits_per_weight": 8 * size / n_weights, "kept_f16": kept}


def _is_our_gguf(path: Path) -> bool:
    """A GGUF file an earlier flopwise export wrote (its mark, or our Modelfile beside it naming it)."""
    try:
        if GGUF_MARK_KEY in gguf.GGUFReader(str(path)).fields:
            return True
    except Exception:  # noqa: BLE001  (not a readable GGUF at all: not ours)
        return False
    modelfile = path.with_name("Modelfile")
    try:
        text = modelfile.read_text(errors="replace")
    except OSError:
        return False
    return text.startswith(MODELFILE_MARK) and f"FROM ./{path.name}\n" in text


GGUF_MARK_KEY = "flopwise.version"
MODELFILE_MARK = "# written by flopwise export"  # an existing Modelfile without it is the user's: never replaced


def write_modelfile(gguf_path: Path, mc: ModelConfig, tuned: bool) -> Path:
    """An ollama Modelfile beside the GGUF: the Alpaca template for tuned runs, the raw prompt otherwise."""
    lines = [MODELFILE_MARK, f"FROM ./{gguf_path.name}", f"PARAMETER num_ctx {mc.seq_len}",
             'PARAMETER stop "</s>"']
    if tuned:
        lines += ['PARAMETER stop "### Instruction:"',
                  'TEMPLATE """{{ if .System }}{{ .System }}{{ else }}' + PREAMBLE + '{{ end }}\n\n'
                  '### Instruction:\n{{ .Prompt }}\n\n### Response:\n"""']
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    path = gguf_path.with_name("Modelfile")
    if path.exists() and f"FROM ./{gguf_path.name}\n" not in path.read_text(errors="replace"):
        path = gguf_path.with_name(f"Modelfile.{gguf_path.stem}")  # another export's: both stay usable
        if path.exists() and not path.read_text(errors="replace").startswith(MODELFILE_MARK):
            raise FlopwiseError(f"{path} exists and was not written by flopwise: export into another folder")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
