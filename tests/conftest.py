"""Shared fixtures: tiny models built offline, isolated run folders, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from ablate.core.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build each tiny architecture once per session; returns arch -> path."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str = "llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            cache[key] = build_tiny_model(root / name, arch=arch, **overrides)
        return cache[key]

    return get


@pytest.fixture
def tiny_llama(tiny_models):
    return tiny_models("llama")
