"""Shared fixtures: one torch thread for tiny-model modules, and the models the tests run on."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): their tensors are tiny, a second thread only
    adds overhead, and on a busy 2-core machine OpenMP threads waiting for each other turn a 0.1 s
    generation into seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode, and every attempt to open a network connection refused and recorded:
    a test using it fails if loading tried to reach the network."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"loading tried to reach the network: {attempts}"


# --- models: the demo model, built once per session (core/models.py, core/demo_model.py) ---


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The demo model's diffusers folder, built once per session into a temporary cache.

    COLLAGE_CACHE points there for the whole session so no test touches the user's ~/.cache.
    """
    from core.demo_model import ensure_demo_model
    from core.paths import CACHE_ENV

    cache = tmp_path_factory.mktemp("collage-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(cache))
    yield ensure_demo_model(cache)
    mp.undo()


@pytest.fixture
def demo_pipeline(demo_model_dir):
    """The loaded demo model (`core.models.LoadedModel`); the model cache keeps it across tests."""
    from core.models import load_pipeline

    return load_pipeline("demo")


# --- end of models fixtures ---


@pytest.fixture(scope="session")
def tiny_sdxl_dir(demo_model_dir):
    """A tiny SDXL-shaped diffusers folder with random weights (core/random_models.py), built once
    per session into the session's cache (the demo fixture set COLLAGE_CACHE)."""
    from core.random_models import ensure_random_model

    return ensure_random_model("sdxl", "tiny", demo_model_dir.parent.parent)


@pytest.fixture
def tiny_sdxl(tiny_sdxl_dir):
    """The loaded tiny SDXL (`core.models.LoadedModel`)."""
    from core.models import load_pipeline

    return load_pipeline(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def library_files(demo_model_dir, tiny_sdxl_dir, tmp_path_factory):
    """Model files of every kind for the model library's tests (tests/library_files.py), written
    once per session: name -> path."""
    from tests.library_files import make_library_files

    return make_library_files(tmp_path_factory.mktemp("library-files"), demo_model_dir, tiny_sdxl_dir)
