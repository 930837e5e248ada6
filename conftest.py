"""Doctest setup: the Omniglot examples need the data, like the Omniglot tests."""

from __future__ import annotations

import os

import pytest

NEEDS_OMNIGLOT = ("metalearn/data/omniglot.py", "metalearn/data/omniglot_archive.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from metalearn.data.omniglot_archive import OmniglotNotFoundError, find_archives

    try:
        find_archives()
        return
    except OmniglotNotFoundError:
        pass
    for item in items:
        if isinstance(item, pytest.DoctestItem) and str(item.path).endswith(NEEDS_OMNIGLOT):
            if os.environ.get("CI"):
                raise pytest.UsageError("CI is set but the Omniglot data are missing; set "
                                        "METALEARN_DATA to the parent of omniglot/")
            item.add_marker(pytest.mark.skip(reason="Omniglot data absent; set METALEARN_DATA"))
