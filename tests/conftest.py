import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own flopwise cache (prepared corpora, hardware probe)."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    # losses must not depend on the machine's load: the default adapts the thread count to it, and with the
    # count change the last bits of the sums; tests that compare losses to 1e-6 need a fixed count
    monkeypatch.setenv("FLOPWISE_THREADS", str(os.cpu_count() or 1))


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """The bundled corpus, prepared once per test session."""
    os.environ["FLOPWISE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    from flopwise.data.prepare import prepare

    return prepare(vocab_size=1024)
