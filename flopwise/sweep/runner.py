"""Running a sweep: a local process pool (or a Ray cluster) over independent run directories.

Re-running a killed sweep trains only what is missing: finished runs (final.json) are skipped,
half-done runs resume from their checkpoints, and a run still held by a live process (its
lock) is waited for, never trained twice.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import torch

from flopwise.config import THREADS_ENV, TrainConfig, requested_threads, resolve
from flopwise.data.prepare import open_corpus
from flopwise.errors import FlopwiseError, install_hint
from flopwise.laws.flops import Shape
from flopwise.model.llama import ModelConfig
from flopwise.run import latest_checkpoint, new_run, read_final, run_is_locked, trained_flops
from flopwise.sweep.design import RunSpec, read_design
from flopwise.training.compile_choice import expected_seconds
from flopwise.training.native import builds
from flopwise.training.probe import C_STEP_MAX_WIDTH, ETA_OVERHEAD, run_rate
from flopwise.training.trainer import train


def sweep_seconds(specs: list[RunSpec], workers: int, threads: int, pool: ProcessPoolExecutor | None = None) -> float:
    """Wall seconds to train ``specs`` on ``workers`` workers of ``threads`` threads each, from a few measured steps of
    each run's shape and micro-batch (the C step's or PyTorch's, as the trainer will choose; the C step's
    remembered, so its runs measure nothing again), each run compiled or not as the trainer will choose. With
    ``pool`` (the sweep's workers, ``worker_pool``) the shapes are measured there, side by side as their runs
    will train. Interpolating between the smallest and the largest shape's rates instead put the bundled sweep at
    134 s for a 110 s sweep: the middle shapes train faster than log-linear in N."""
    def key(s: RunSpec) -> tuple[tuple, int]:
        micro = resolve(Shape(**s.shape), TrainConfig(n_tokens=s.n_tokens, **s.options)).micro_batch
        return tuple(sorted(s.shape.items())), micro

    # each shape and micro-batch once, the largest first (the workers then finish their measurements together)
    shapes = [k for k, _ in sorted({key(s): s.n_params for s in specs}.items(), key=lambda kv: -kv[1])]
    if pool is not None:
        futures = {k: pool.submit(_run_rate_remote, dict(k[0]), threads, k[1]) for k in shapes}
        _build_c_step(specs)  # here, while the workers start (they wait for this build rather than make their own)
        rates = {k: f.result() for k, f in futures.items()}
    else:
        rates = {k: run_rate(dict(k[0]), threads, k[1]) for k in shapes}

    def seconds(s: RunSpec) -> float:
        k = key(s)
        return expected_seconds(s.flops / rates[k] * ETA_OVERHEAD, rates[k], s.shape, k[1],
                                s.options.get("compile", "auto"), threads)

    each = [seconds(s) for s in specs]
    return max(sum(each) / min(workers, len(each)), max(each))  # no faster than its longest run


def eta_line(todo: list[RunSpec], workers: int, threads: int, pool: ProcessPoolExecutor | None = None) -> str:
    """The ETA of the runs left (``sweep_seconds``) as the sweep commands print it, or that none is left."""
    if not todo:
        return "every run already done"
    runs = f"{len(todo)} run" + "s" * (len(todo) != 1)
    return (f"ETA about {sweep_seconds(todo, workers, threads, pool) / 60:.1f} min for {runs} on {workers} worker(s) "
            "(measured on this machine)")


def _build_c_step(specs: list[RunSpec]) -> None:
    """The C training step built (or found built) where a run of the sweep would use it."""
    if min(s.shape["d_model"] for s in specs) <= C_STEP_MAX_WIDTH:
        builds()


@contextlib.contextmanager
def worker_pool(workers: int, split: tuple[int, bool] | None = None) -> Iterator[ProcessPoolExecutor | None]:
    """The sweep's worker processes (None for one worker: the runs train in this process), started at once: each
    imports torch and the trainer (about 2 s on 2 cores), which overlaps the parent's work before the first run
    (the C step's build, the ETA's measurements, which then run in the workers). ``split``: (threads per worker,
    fixed), as ``worker_threads`` gives it. On an error or Ctrl-C the workers are killed (their runs resume from
    their checkpoints) and the work not started is dropped."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=split or worker_threads(workers))
    try:
        for _ in range(workers):  # a spawn pool starts a worker per task waiting
            pool.submit(_warm_up)
        yield pool
    except BaseException:
        # the runs in flight end now (they resume from their checkpoints): the pool's own shutdown would wait for
        # them, and for the next run queued, before this process could exit
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _warm_up() -> None:
    """A worker's first task: the import each run's optimizer makes (torch.optim imports torch._dynamo, about a
    second), made while the parent still works."""
    try:
        import torch._dynamo  # noqa: F401
    finally:
        _newest_exit()


def _run_rate_remote(shape: dict, threads: int, micro_batch: int) -> float:
    try:
        return run_rate(shape, threads, micro_batch)
    finally:
        _newest_exit()


def _die_with_parent() -> None:
    """Linux: ask the kernel to kill this worker when the sweep process dies (e.g. kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def default_workers(n_runs: int) -> int:
    """One worker per core (per --threads when it is fixed), never more than there are runs."""
    return max(1, min(requested_threads(0) or os.cpu_count() or 1, n_runs))


def worker_threads(workers: int) -> tuple[int, bool]:
    """(threads per worker, whether fixed): --threads / $FLOPWISE_THREADS (else every core) shared out among the
    workers, so the sweep's processes together never ask for more threads than that."""
    fixed = requested_threads(0)
    return max(1, (fixed or os.cpu_count() or 1) // max(1, workers)), bool(fixed)


def _use_threads(threads: int, fixed: bool) -> None:
    """In a worker: train with ``threads`` (the trainer adapts below it to the free cores unless ``fixed``)."""
    torch.set_num_threads(threads)
    if fixed:
        os.environ[THREADS_ENV] = str(threads)
    else:
        os.environ.pop(THREADS_ENV, None)


_fast_exit = False  # set in a pool worker: it ends through _exit_now


def _exit_now() -> None:
    """A pool worker's exit: the other exit handlers run, output is flushed, and the process ends without tearing
    down its interpreter (freeing torch's and dynamo's modules object by object took ~1 s, which the sweep waited
    for). It must be the newest handler (_newest_exit), as atexit runs them newest first: the call below runs the
    rest, and a handler newer than this one would run twice. The exit status is 0: the pool reads none."""
    atexit.unregister(_exit_now)
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    finally:
        os._exit(0)


def _newest_exit() -> None:
    """In a pool worker, after each task: _exit_now becomes the newest exit handler again (a run's libraries
    register theirs, e.g. torch's compile workers)."""
    if _fast_exit:
        atexit.unregister(_exit_now)
        atexit.register(_exit_now)


def _init_worker(threads: int, fixed: bool) -> None:
    global _fast_exit
    _die_with_parent()
    _use_threads(threads, fixed)
    _fast_exit = True
    _newest_exit()


def run_one(sweep_dir: str, spec: dict, corpus_path: str, train_options: dict) -> dict:
    """Create (if needed) and train one run of a sweep; returns its final.json."""
    run_dir = Path(sweep_dir) / spec["name"]
    if not (run_dir / "config.json").exists():
        options = {**train_options, **spec.get("options", {})}
        if options.get("branch_from"):
            options["branch_from"] = str(Path(sweep_dir) / options["branch_from"])
        options["extra"] = {"budget": spec["budget"], **options.get("extra", {})}
        tc = TrainConfig(n_tokens=spec["n_tokens"], **options)
        try:
            new_run(run_dir, ModelConfig(**spec["shape"]), tc, open_corpus(corpus_path))
        except FlopwiseError:
            if not (run_dir / "config.json").exists():
                raise
    return train(run_dir, quiet=True)


def status(sweep_dir: str | Path) -> list[dict]:
    """Each run's state: done (with its loss), running (locked by a live process), partial, or missing."""
    runs, _ = read_design(sweep_dir)
    out = []
    for r in runs:
        d = Path(sweep_dir) / r.name
        row = {"name": r.name, "budget": r.budget, "n_params": r.n_params, "n_tokens": r.n_tokens}
        f = read_final(d)
        if f is not None:
            row.update(state="done", val_loss=f["val_loss"], wall_seconds=f["wall_seconds"])
        elif run_is_locked(d):
            row["state"] = "running"
        elif latest_checkpoint(d).exists():
            row["state"] = "partial"
        else:
            row["state"] = "missing"
        out.append(row)
    return out


def unfinished(sweep_dir: str | Path, specs: list[RunSpec]) -> list[RunSpec]:
    """The runs of ``specs`` without a final.json in ``sweep_dir`` (not started, or stopped before their end)."""
    return [s for s in specs if not (Path(sweep_dir) / s.name / "final.json").exists()]


def run_sweep(sweep_dir: str | Path, workers: int = 1, threads: int | None = None, ray_address: str | None = None,
              progress=None, pool: ProcessPoolExecutor | None = None) -> list[dict]:
    """Train every run of the sweep that has no final.json; ``progress(done_flops, total_flops, n_done, n)``, on a
    pool every second with the runs in flight counted (their last logged step), else as each run finishes.
    ``pool``: the workers ``worker_pool`` started (else this call starts its own)."""
    sweep_dir = Path(sweep_dir)
    specs, meta = read_design(sweep_dir)
    threads, fixed = (threads, True) if threads else worker_threads(workers)
    total = sum(s.flops for s in specs)
    todo = unfinished(sweep_dir, specs)
    done_flops = total - sum(s.flops for s in todo)
    n_done = len(specs) - len(todo)
    if progress:
        progress(done_flops, total, n_done, len(specs))
    if not todo:
        return []
    results = []
    with contextlib.ExitStack() as stack:
        if pool is None and ray_address is None:
            pool = stack.enter_context(worker_pool(min(workers, len(todo)), (threads, fixed)))
        for phase in sorted({s.phase for s in todo}):  # WSD: trunks (phase 0) before their branches
            batch = sorted((s for s in todo if s.phase == phase), key=lambda s: -s.flops)  # largest first
            out, done_flops, n_done = _run_batch(sweep_dir, batch, meta, pool, (threads, fixed), ray_address,
                                                 progress, done_flops, total, n_done, len(specs))
            results += out
    return results


def _run_batch(sweep_dir: Path, todo: list[RunSpec], meta: dict, pool: ProcessPoolExecutor | None,
               threads: tuple[int, bool], ray_address, progress, done_flops: float, total: float, n_done: int,
               n_specs: int):
    args = [(str(sweep_dir), s.__dict__, meta["corpus"], meta.get("train_options", {})) for s in todo]
    if ray_address is not None:
        return _run_ray(args, todo, ray_address, threads, progress, done_flops, total, n_done, n_specs)
    results = []
    if pool is None:
        before = os.environ.get(THREADS_ENV)
        _use_threads(*threads)
        try:
            for spec, a in zip(todo, args, strict=True):
                results.append(_wait_if_locked(sweep_dir / spec.name, lambda a=a: run_one(*a)))
                done_flops, n_done = done_flops + spec.flops, n_done + 1
                if progress:
                    progress(done_flops, total, n_done, n_specs)
        finally:  # this process goes on: its own setting comes back
            if before is None:
                os.environ.pop(THREADS_ENV, None)
            else:
                os.environ[THREADS_ENV] = before
        return results, done_flops, n_done
    pending = {pool.submit(_wait_if_locked_remote, *a): s for a, s in zip(args, todo, strict=True)}
    shown = done_flops
    while pending:
        finished, _ = wait(pending, timeout=PROGRESS_SECONDS, return_when=FIRST_COMPLETED)
        for fut in finished:
            spec = pending.pop(fut)
            results.append(fut.result())
            done_flops, n_done = done_flops + spec.flops, n_done + 1
        if progress:  # with the runs in flight: counting finished runs alone, the bar's first ETAs ran 2x long
            running = sum(_run_progress(sweep_dir / s.name, s) for s in pending.values())
            # never backwards: a resumed run's metrics past its checkpoint are cut when it starts again
            shown = max(shown, done_flops + running)
            progress(shown, total, n_done, n_specs)
    return results, done_flops, n_done


PROGRESS_SECONDS = 1.0  # how often a sweep reads its running runs' progress


def _run_progress(run_dir: Path, spec: RunSpec) -> float:
    """FLOPs of ``spec`` its run has trained so far (a WSD branch's trunk part not counted)."""
    return min(spec.flops, max(0.0, trained_flops(run_dir) - (spec.full_flops - spec.flops)))


def _wait_if_locked(run_dir: Path, fn, poll_seconds: float = 1.0):
    """Wait while another live process trains this run (e.g. an orphan of a killed sweep)."""
    while run_is_locked(run_dir):
        time.sleep(poll_seconds)
    return read_final(run_dir) or fn()


def _wait_if_locked_remote(sweep_dir: str, spec: dict, corpus_path: str, train_options: dict) -> dict:
    try:
        return _wait_if_locked(Path(sweep_dir) / spec["name"],
                               lambda: run_one(sweep_dir, spec, corpus_path, train_options))
    finally:
        _newest_exit()


def _run_ray(args, todo: list[RunSpec], address: str, threads: tuple[int, bool], progress, done_flops, total, n_done,
             n):
    try:
        import ray  # optional: only sweeps on a Ray cluster need it
    except ImportError:
        raise FlopwiseError(f"--ray needs Ray: {install_hint('ray')}") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=threads[0])(_ray_task)
    refs = {remote.remote(threads, *a): s for a, s in zip(args, todo, strict=True)}
    results = []
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            spec = refs.pop(ref)
            results.append(ray.get(ref))
            done_flops, n_done = done_flops + spec.flops, n_done + 1
            if progress:
                progress(done_flops, total, n_done, n)
    return results, done_flops, n_done


def _ray_task(threads: tuple[int, bool], sweep_dir: str, spec: dict, corpus_path: str, train_options: dict) -> dict:
    _use_threads(*threads)
    return _wait_if_locked_remote(sweep_dir, spec, corpus_path, train_options)
