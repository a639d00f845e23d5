import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.pipeline.calibration import read_texts
from lowbit.pipeline.samples import calibration_batch, sample_windows


def test_windows_are_seeded_slices_of_the_stream():
    ids = torch.arange(1000)
    a = sample_windows(ids, 8, 16, seed=3)
    assert a.shape == (8, 16) and torch.equal(a, sample_windows(ids, 8, 16, seed=3))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the stream
    assert not torch.equal(a, sample_windows(ids, 8, 16, seed=4))


def test_text_shorter_than_one_sample_is_refused(tiny_tokenizer):
    with pytest.raises(LowbitError, match="fewer than one sample of 256"):
        calibration_batch(tiny_tokenizer, ["just a few words here"], 4, 256)


def test_jsonl_and_txt_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("plain text file")
    assert read_texts(tmp_path / "a.jsonl") == ["first doc", "second"]
    assert read_texts(str(tmp_path / "b.txt")) == ["plain text file"]
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(LowbitError, match="no string field 'text'"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(LowbitError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_bundled_calibration_text_is_the_default():
    docs = read_texts(None)
    assert len(docs) > 10 and sum(map(len, docs)) > 100_000
