import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Long chaos runs only when asked for: ``-m chaos``."""
    if "chaos" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long chaos run: python -m pytest tests -m chaos")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)
