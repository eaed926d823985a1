import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")

import pytest

# Helpers live in helpers.py (``from helpers import ...``); the names below stay importable from conftest only until
# the last test modules that import them from here are switched.
from helpers import (  # noqa: F401
    anisotropic_moment, char_tokenizer, copy_dir, edited_copy, tiny_llama, token_batches,
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory with a tokenizer (read-only: copy it to change it)."""
    path = tmp_path_factory.mktemp("tiny_dir") / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def batches():
    return token_batches()
