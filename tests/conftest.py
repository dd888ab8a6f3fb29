"""Fixtures and pytest hooks; the helpers they use live in support.py."""
import os

import pytest

from support import load_model, make_model_dir

try:
    from hypothesis import settings

    settings.register_profile("default", max_examples=25, deadline=None)
    settings.register_profile("long", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except Exception:  # hypothesis missing or profile already registered
    pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)
