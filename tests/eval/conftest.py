import pytest

from tests.eval.helpers import tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A HF model folder (random tiny Llama + the shared tiny BPE tokenizer) for compare and the CLI."""
    path = tmp_path_factory.mktemp("compare") / "tiny-llama"
    tiny_llama(hidden=128, max_positions=128).save_pretrained(path)  # Linear inputs 128 and 384: g128 divides
    tiny_tokenizer.save_pretrained(path)
    return path
