import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own flopwise cache (prepared corpora, hardware probe)."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """The bundled corpus, prepared once per test session."""
    import os

    os.environ["FLOPWISE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    from flopwise.data.prepare import prepare

    return prepare(vocab_size=1024)
