"""The semi-supervised split and the resumable data order."""

import pytest
import torch

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data import load_ssl_data
from trustmatch.data.image_sets import ImageSet, SourceData
from trustmatch.data.sampler import IndexStream
from trustmatch.data.split import make_ssl_split


def _source(per_class: int = 10, classes: int = 3) -> SourceData:
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return SourceData(ImageSet(images, labels), None, [f"c{i}" for i in range(classes)], (0.5,), (0.25,), False)


def test_split_is_stratified_disjoint_and_seeded() -> None:
    data = make_ssl_split(_source(), labels_per_class=2, val_per_class=1, test_fraction=0.2, seed=3)
    assert torch.bincount(data.labeled.labels).tolist() == [2, 2, 2]
    assert torch.bincount(data.val.labels).tolist() == [1, 1, 1]
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2]
    ids = [s.images[:, 0, 0, 0].tolist() for s in (data.labeled, data.val, data.test, data.unlabeled)]
    flat = sum(ids, [])
    assert len(flat) == len(set(flat)) == 30
    again = make_ssl_split(_source(), 2, 1, 0.2, seed=3)
    assert torch.equal(again.labeled.images, data.labeled.images)
    other = make_ssl_split(_source(), 2, 1, 0.2, seed=4)
    assert torch.equal(other.test.images, data.test.images)  # test split does not depend on the seed
    assert not torch.equal(other.labeled.images, data.labeled.images)


def test_labels_per_class_too_large_names_the_class() -> None:
    with pytest.raises(UserError, match="class 'c0' has 8 training images but data.labels_per_class=9"):
        make_ssl_split(_source(), labels_per_class=9, val_per_class=0, test_fraction=0.2, seed=0)


def test_digits_default_split() -> None:
    data = load_ssl_data(DataConfig(name="digits", labels_per_class=4, val_per_class=5), seed=0)
    assert len(data.labeled) == 40 and len(data.val) == 50
    assert len(data.labeled) + len(data.val) + len(data.unlabeled) + len(data.test) == 1797
    assert data.labeled.images.shape[1:] == (1, 16, 16) and data.labeled.images.dtype == torch.uint8
    assert abs(len(data.test) - 0.2 * 1797) < 10


def test_index_stream_spans_epochs_and_resumes_exactly() -> None:
    stream = IndexStream(size=5, batch_size=4, seed=1)
    batches = [stream.next() for _ in range(5)]
    seen = torch.cat(batches)
    for epoch in range(4):  # 20 indices = 4 full permutations of 5
        assert sorted(seen[epoch * 5 : (epoch + 1) * 5].tolist()) == list(range(5))
    resumed = IndexStream(5, 4, seed=1)
    resumed.load_state_dict({"position": 8})
    assert torch.equal(resumed.next(), batches[2])
