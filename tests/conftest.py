"""Shared pytest fixtures.

Omniglot: the real zips, found through ``$METALEARN_DATA`` (CI sets it to ../shared/data),
decoded once per session into a temporary ``$METALEARN_CACHE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ``METALEARN_CACHE`` for the session, so no test reads or writes a user's cache."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("metalearn_cache")
    mp.setenv("METALEARN_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def omniglot_zips(omniglot_cache: Path) -> dict[str, Path]:
    """Paths of the real Omniglot zips; skips only where the data are absent and CI is unset."""
    from metalearn.data.omniglot_archive import OmniglotNotFoundError, find_archives

    try:
        return find_archives()
    except OmniglotNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the Omniglot data are missing (tests would skip): {e}")
        pytest.skip(f"Omniglot data absent; set METALEARN_DATA to the parent of omniglot/. {e}")


@pytest.fixture(scope="session")
def omniglot_images(omniglot_zips: dict[str, Path]) -> torch.Tensor:
    """All images, uint8 (1623, 20, 28, 28): the session's one decode."""
    from metalearn.data.omniglot_archive import load_images

    return load_images(progress=False)
