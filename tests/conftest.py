import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")

import pytest

from helpers import char_tokenizer, tiny_llama, token_batches  # tests import helpers from helpers.py too


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
