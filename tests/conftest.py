import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one thread is faster, and far faster on a busy machine (no thread barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
