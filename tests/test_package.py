"""The package as users install it: `python -m build` makes a wheel and an sdist with the bundled corpus
inside; the wheel installs into a fresh virtual environment and plans and prepares from outside the
checkout; torch is an extra, not a requirement."""

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ["flopwise/assets/tinystories/train.txt", "flopwise/assets/tinystories/valid.txt",
          "flopwise/assets/tinystories/LICENSE-CDLA-Sharing-1.0.txt", "flopwise/assets/tinystories/INSTRUCTIONS.md",
          "flopwise/infer/step.c", "flopwise/training/step.c"]  # the C steps' sources, compiled on the user's machine


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools) of this environment, no download
    # no --wheel/--sdist: the sdist first, then the wheel from it (a clean tree: no stale build/ files)
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_wheel_and_sdist_hold_the_code_and_the_bundled_corpus(dist):
    wheel = next(dist.glob("flopwise-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"flopwise/cli/__init__.py", "flopwise/api.py", "flopwise/data/sources.py", *ASSETS} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    torch = [r for r in requires if r.startswith("Requires-Dist: torch")]
    assert torch and all('extra == "train"' in r for r in torch), torch  # the planner installs without torch
    assert "Provides-Extra: data" in metadata and "Provides-Extra: track" in metadata
    sdist = next(dist.glob("flopwise-*.tar.gz"))
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    assert {*ASSETS, "pyproject.toml", "README.md"} <= members


def test_the_wheel_installs_into_a_fresh_venv_and_runs(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # the dependencies come from this environment (no download): a path entry, read after the venv's own
    site = next((env_dir / "lib").glob("python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "numpy").exists())
    (site / "zz-deps.pth").write_text(str(deps) + "\n")
    wheel = next(dist.glob("flopwise-*.whl"))
    done = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "FLOPWISE_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([python, "-c", "import flopwise; print(flopwise.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout + where.stderr  # the wheel, not the checkout
    flopwise = env_dir / "bin" / "flopwise"
    plan = subprocess.run([flopwise, "plan", "--flops", "1e20", "--json"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert plan.returncode == 0 and '"n_params"' in plan.stdout, plan.stderr
    prepared = subprocess.run([flopwise, "prepare", "--vocab-size", "512", "--out", "corpus", "--json"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert (tmp_path / "corpus" / "tokens-train.bin").stat().st_size > 100_000
    # planning never needs torch: with torch made unimportable, plan still answers and train names the extra
    no_torch = ("import sys; sys.modules['torch'] = None; from flopwise.cli import main; "
                "main(sys.argv[1:])")
    plan = subprocess.run([python, "-c", no_torch, "plan", "--flops", "1e20", "--json"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert plan.returncode == 0 and '"n_params"' in plan.stdout, plan.stderr
    train = subprocess.run([python, "-c", no_torch, "train", "--n-params", "1e5", "--tokens", "1e5", "--out", "r"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert train.returncode == 2 and train.stderr.strip() == ("error: 'flopwise train' needs torch, which is not "
                                                              "installed: pip install 'flopwise[train]'")
    assert not (tmp_path / "r").exists()
    if shutil.which("cc") or shutil.which("gcc"):  # the installed package builds its C steps from its own sources
        for module in ("flopwise.infer.native", "flopwise.training.native"):
            built = subprocess.run([python, "-c", f"from {module} import library; print(library()._name)"],
                                   capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
            assert built.returncode == 0 and str(tmp_path / "cache" / "native") in built.stdout, built.stderr


def test_every_optional_module_names_the_extra_that_installs_it():
    """The one-line 'needs X: pip install flopwise[extra]' hints must name an extra that holds X."""
    import re

    import tomllib

    from flopwise.errors import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    package = {"llama_cpp": "llama-cpp-python"}  # where the distribution's name is not the module's
    for module, extra in EXTRAS.items():
        names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in extras[extra]}
        assert package.get(module, module) in names, (module, extra, names)
