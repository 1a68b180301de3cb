import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_neo_dir(tmp_path_factory):
    """A tiny random GPT-Neo saved with a byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny-neo")
    save_tiny(path, "gpt_neo")
    return str(path)
