"""Shared pytest fixtures and markers for the videollm test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~10 s; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic data set made by ``videollm.synthetic.generate(..., seed=0)`` with its defaults.

    Layout and manifest are described in the docstring of :mod:`videollm.synthetic`; read
    ``synthetic_root / "manifest.json"`` for every clip's and image's attributes.
    """
    from videollm.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root
