"""Read a llama-architecture GGUF file back into flopwise: the model and its tokenizer.

Lets ``flopwise generate/chat/serve`` run a .gguf file directly, and closes the export round trip
in tests. Quantised tensors are dequantised with the ``gguf`` package; Q and K rows go back from
llama.cpp's pair order to the half-rotation order; the vocabulary becomes a SentencePiece BPE
model with byte fallback (the normaliser settings flopwise trains with).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from flopwise.errors import FlopwiseError
from flopwise.infer.export import GGUF_LAYER_NAMES
from flopwise.model.llama import Llama, ModelConfig


def unpermute_from_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()


def _tokenizer(reader):
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise FlopwiseError("this GGUF's tokenizer is not a SentencePiece ('llama') vocabulary: flopwise reads only "
                            "its own kind")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    m = pb.ModelProto()
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for t, s, k in zip(tokens, scores, types, strict=True):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, kinds.get(int(k), pb.ModelProto.SentencePiece.NORMAL)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
    ts.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id", 1))
    ts.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id", 2))
    ts.pad_id = -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def load_gguf(path: str | Path) -> tuple[Llama, object]:
    """(model, SentencePiece tokenizer) of a llama-architecture GGUF file."""
    return _reading(Path(path), _load)


def gguf_config_and_tokenizer(path: str | Path) -> tuple[ModelConfig, object]:
    """(model config, SentencePiece tokenizer) of a GGUF file, its weights left unread."""
    def read(p: Path) -> tuple[ModelConfig, object]:
        reader = gguf.GGUFReader(str(p))
        return _config(reader, p), _tokenizer(reader)

    return _reading(Path(path), read)


def _reading(path: Path, read):
    try:
        return read(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        # the reader memory-maps the file and finds a cut or garbled one only as it goes
        raise FlopwiseError(f"cannot read GGUF file {path}: it is damaged or truncated ({type(e).__name__}: "
                            f"{str(e)[:120]}): export it again") from None


def _config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise FlopwiseError(f"{path} holds a {arch!r} model; flopwise runs the llama architecture only")
    k = "llama."
    n_heads = int(_field(reader, k + "attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors["token_embd.weight"]
    vocab, d_model = int(emb.shape[1]), int(emb.shape[0])
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=int(_field(reader, k + "block_count")),
                     n_heads=n_heads, n_kv_heads=int(_field(reader, k + "attention.head_count_kv", n_heads)),
                     d_ff=int(_field(reader, k + "feed_forward_length")),
                     seq_len=int(_field(reader, k + "context_length")),
                     tie_embeddings="output.weight" not in tensors,
                     norm_eps=float(_field(reader, k + "attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=float(_field(reader, k + "rope.freq_base", 10000.0)))


def _load(path: Path) -> tuple[Llama, object]:
    reader = gguf.GGUFReader(str(path))
    mc = _config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr))

    sd = {"embed.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    sd["head.weight"] = sd["embed.weight"] if mc.tie_embeddings else get("output.weight")
    for i in range(mc.n_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            w = get(f"blk.{i}.{theirs}.weight")
            if ours in ("wq", "wk"):
                w = torch.from_numpy(unpermute_from_llama_cpp(w.numpy(), mc.n_heads if ours == "wq" else mc.n_kv_heads))
            sd[f"layers.{i}.{ours}.weight"] = w
    model = Llama(mc)
    model.load_state_dict(sd)
    return model.eval(), _tokenizer(reader)
