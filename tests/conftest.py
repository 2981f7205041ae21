# --- models: the demo model, built once per session (core/models.py, core/demo_model.py) ---
import pytest


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
