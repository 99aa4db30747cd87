import sys

import pytest

from rewriter.progress import set_quiet
from tests.helpers import SAMPLES


@pytest.fixture(autouse=True)
def _quiet():
    set_quiet(True)
    yield
    set_quiet(False)


@pytest.fixture(scope="session")
def real():
    """{name: (model path, calibration path)} for the pretrained proving-ground models (fetched once, cached)."""
    sys.path.insert(0, str(SAMPLES))
    from fetch_real_models import build_calibration, default_cache, fetch_models

    cache = default_cache()
    models, calibs = fetch_models(cache), build_calibration(cache)
    return {name: (models[name], calibs[name]) for name in models}
