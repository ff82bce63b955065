"""llama.cpp as a decoding backend (``--backend llama.cpp``), where llama-cpp-python is installed.

The engine below has flopwise's Engine interface (stream_text, generate, bench), so generate, chat
and serve use it unchanged: prompts are tokenized by flopwise's own tokenizer and fed to llama.cpp as
ids, and every next token is picked by flopwise's sampler from llama.cpp's logits. Sampling options,
stop strings, seeds and streaming therefore mean exactly what they mean natively; only the forward
pass is llama.cpp's. A run directory is exported to GGUF once and cached (keyed by its checkpoint).
"""

from __future__ import annotations

import hashlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from flopwise import __version__
from flopwise.data.tokenizer import EOS_ID, load_tokenizer
from flopwise.errors import FlopwiseError, install_hint
from flopwise.fsutil import cache_root
from flopwise.infer.export import _check_expressible, _vocab, write_gguf
from flopwise.infer.generate import Engine, Sampling, bench_prompt, sample_next
from flopwise.model.llama import ModelConfig
from flopwise.run import latest_checkpoint, load_model, read_run_config

# flopwise's runtime dtypes and the GGUF types that store the same precision for llama.cpp
GGUF_QUANT = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}


def llama_cpp_module():
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed, or its shared library does not load
        raise FlopwiseError(f"--backend llama.cpp needs llama-cpp-python, which is not installed: "
                            f"{install_hint('llama_cpp')} (or 'make test-interop', which builds it)") from None
    return llama_cpp


def run_gguf(run_dir: Path, dtype: str, log=print) -> Path:
    """A GGUF file of a run's latest weights at ``dtype``'s precision, written once into the cache (one file a
    run and precision: a newer checkpoint's replaces the older one's)."""
    files = (latest_checkpoint(run_dir), run_dir / "tokenizer.model", run_dir / "config.json")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FlopwiseError(f"{run_dir} has no {missing[0].name}: train it first (or give a .gguf file)")
    mc = read_run_config(run_dir)[0]
    _check_expressible(mc)
    stamp = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    run_key = hashlib.sha256(f"{run_dir.resolve()} {GGUF_QUANT[dtype]}".encode()).hexdigest()[:12]
    key = hashlib.sha256(repr((stamp, __version__)).encode()).hexdigest()[:12]
    path = cache_root() / "gguf" / f"{run_key}-{key}.gguf"
    if not path.exists():
        log(f"note: exporting {run_dir} to GGUF ({GGUF_QUANT[dtype]}) for llama.cpp, once: {path}")
        write_gguf(load_model(run_dir), _vocab(load_tokenizer(run_dir / "tokenizer.model")), path,
                   GGUF_QUANT[dtype], run_dir.resolve().name)
        for old in path.parent.glob(f"{run_key}-*.gguf"):  # the same run's earlier weights
            if old != path:
                old.unlink(missing_ok=True)
    return path


class LlamaCppEngine(Engine):
    """Engine's interface over a llama.cpp context (batch 1; a batch of prompts is decoded one by one)."""

    def __init__(self, gguf_path: Path, config: ModelConfig, sp, dtype: str, threads: int | None = None):
        self._llama_cpp = llama_cpp = llama_cpp_module()
        self.sp, self.dtype, self.config, self.path = sp, dtype, config, Path(gguf_path)
        threads = threads or torch.get_num_threads()
        try:
            # an f32 KV cache at fp32, so greedy decoding agrees with the native engine token for token
            cache = {"type_k": 0, "type_v": 0} if dtype in ("fp32", "file") else {}
            self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=config.seq_len, n_threads=threads,
                                       n_threads_batch=threads, n_batch=min(512, config.seq_len), verbose=False,
                                       **cache)
        except (ValueError, RuntimeError) as e:
            raise FlopwiseError(f"llama.cpp cannot load {gguf_path} ({e}): check the file, or use --backend "
                                "flopwise") from None

    @classmethod
    def open(cls, path: str | Path, dtype: str, threads: int | None = None, log=print) -> LlamaCppEngine:
        """From a run directory (exported to a cached GGUF at ``dtype``) or a .gguf file (used as it is)."""
        path = Path(path)
        if path.is_file():
            from flopwise.infer.gguf_load import gguf_config_and_tokenizer

            config, sp = gguf_config_and_tokenizer(path)
            if dtype != "fp32":
                log(f"note: --dtype {dtype} does not apply to a .gguf file: llama.cpp runs it as it is stored")
            return cls(path, config, sp, "file", threads)
        config = read_run_config(path)[0]
        return cls(run_gguf(path, dtype, log), config, load_tokenizer(path / "tokenizer.model"), dtype, threads)

    def _logits(self) -> torch.Tensor:
        """The last evaluated position's logits (1, vocab), copied out of llama.cpp's buffer."""
        row = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.config.vocab_size,)).copy())[None]

    def _eval(self, ids: list[int]) -> None:
        try:
            self.llm.eval(ids)
        except RuntimeError as e:
            raise FlopwiseError(f"llama.cpp failed to decode ({e}): use --backend flopwise") from None

    def _row(self, prompt: list[int], s: Sampling, budget: int, gen) -> Iterator[int]:
        self.llm.reset()
        self._eval(prompt)
        history = torch.tensor([prompt])
        for i in range(budget):
            nxt = int(sample_next(self._logits(), s, history if s.repetition_penalty != 1.0 else None, gen)[0])
            yield nxt
            if nxt == EOS_ID or i == budget - 1:
                return
            history = torch.cat([history, torch.tensor([[nxt]])], 1)
            self._eval([nxt])

    def stream_ids(self, prompts: list[list[int]], s: Sampling) -> Iterator[torch.Tensor]:
        s.check()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FlopwiseError("empty prompt")
        width, ctx = max(len(p) for p in prompts), self.config.seq_len
        if width >= ctx:
            raise FlopwiseError(f"the prompt has {width} tokens; the model's context is {ctx}: shorten it")
        budget = min(s.max_new_tokens, ctx - width)
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        if len(prompts) == 1:
            for t in self._row(prompts[0], s, budget, gen):
                yield torch.tensor([t])
            return
        rows = [list(self._row(p, s, budget, gen)) for p in prompts]
        for i in range(max(map(len, rows))):
            yield torch.tensor([r[i] if i < len(r) else EOS_ID for r in rows])

    def stream_texts(self, prompts: list[list[int]], samplings: list[Sampling]
                     ) -> Iterator[tuple[int, str | None, dict | None]]:
        """One row after another (this context decodes one sequence), each streamed as it goes and stopped at
        its own budget and stop strings."""
        for i, (p, s) in enumerate(zip(prompts, samplings, strict=True)):
            for _, piece, info in super().stream_texts([p], [s]):
                yield i, piece, info

    def bench(self, prompt_tokens: int = 32, new_tokens: int = 128, batch: int = 1) -> dict:
        prompt = bench_prompt(self.config.vocab_size, prompt_tokens)
        new_tokens = min(new_tokens, self.config.seq_len - prompt_tokens)
        s = Sampling(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        for _ in self.stream_ids([prompt], Sampling(max_new_tokens=4, temperature=0)):  # warm-up
            pass
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t_prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = sum(1 for _ in self.stream_ids([prompt], s))
        t_all = time.perf_counter() - t0
        return {"prompt_tok_per_s": prompt_tokens / t_prompt,
                "decode_tok_per_s": max(n - 1, 1) / max(t_all - t_prompt, 1e-9), "new_tokens": n, "batch": 1,
                "dtype": f"llama.cpp {self.dtype}",
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
