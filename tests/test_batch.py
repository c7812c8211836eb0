"""Batches built by RLDSDataset(batch_size=...): bit for bit the collated samples, exact resume
through a DataLoader with and without workers, states shared with the per-sample form, frames
decoded once, errors at the batch they belong to."""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import simplejpeg

import torch_rlds
from torch_rlds import _images, synthetic
from torch_rlds.loader import default_start_method
from torch_rlds.testing import assert_batches_equal, assert_resumes_exactly

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

# Short episodes (one of a single step) next to long ones, two cameras of different sizes.
VARIED = dict(num_episodes=7, episode_lengths=(1, 9, 2, 12, 3, 2, 6), num_shards=2,
              cameras=(synthetic.Camera("image", 32, 32), synthetic.Camera("wrist", 32, 48)))


@pytest.fixture(scope="module")
def varied(write_dataset):
    return write_dataset(**VARIED)


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _dataset(path, **options):
    return torch_rlds.RLDSDataset(path, **{"obs_window": 2, "action_horizon": 4,
                                           "shuffle_window": 3, **options})


@pytest.mark.parametrize("obs_window, action_horizon, shuffle, batch_size, threads", [
    (1, 1, True, 1, 1),
    (2, 4, True, 5, 2),
    (3, 16, False, 4, 3),   # overlapping windows: a frame shared by samples is decoded once
    (5, 3, False, 64, 1),   # one batch larger than the epoch
])
def test_batches_equal_the_collated_samples(varied, obs_window, action_horizon, shuffle,
                                            batch_size, threads):
    options = dict(obs_window=obs_window, action_horizon=action_horizon, shuffle=shuffle,
                   repeat=False, seed=4, decode_threads=threads)
    samples = list(_dataset(varied, **options))
    expected = [torch_rlds.collate(chunk) for chunk in _chunks(samples, batch_size)]
    batches = list(_dataset(varied, batch_size=batch_size, **options))
    assert len(batches) == len(expected) == -(-sum(VARIED["episode_lengths"]) // batch_size)
    for i, (got, want) in enumerate(zip(batches, expected)):
        assert_batches_equal(want, got, f"batch {i}")
    assert batches[0]["observation"]["wrist"].shape[1:] == (obs_window, 32, 48, 3)


def test_endless_batches_cross_epochs_like_the_samples(varied):
    total = sum(VARIED["episode_lengths"])
    samples = list(itertools.islice(_dataset(varied), 3 * total))
    batches = list(itertools.islice(_dataset(varied, batch_size=4), 3 * total // 4))
    for i, (got, chunk) in enumerate(zip(batches, _chunks(samples, 4))):
        assert_batches_equal(torch_rlds.collate(chunk), got, f"batch {i}")
    assert {e for b in batches for e in b["meta"]["epoch"].tolist()} == {0, 1, 2}


@pytest.mark.parametrize("order", ["window", "global"])
def test_drop_last_drops_the_short_batch_and_ends_the_epoch(varied, order):
    dataset = _dataset(varied, repeat=False, batch_size=4, drop_last=True, order=order)
    batches = list(dataset)
    total = sum(VARIED["episode_lengths"])
    assert len(batches) == total // 4
    assert all(len(b["language_instruction"]) == 4 for b in batches)
    state = dataset.state_dict()  # the epoch is finished...
    if order == "window":
        assert state["window"] == 3
    else:  # the short batch was dropped, its samples consumed all the same
        assert state["start"] + state["done"] * state["batch_size"] == -(-total // 4) * 4
    assert {e for b in dataset for e in b["meta"]["epoch"].tolist()} == {1}  # ...next is 1


def test_a_state_of_either_form_resumes_the_other(varied):
    reference = list(itertools.islice(_dataset(varied), 60))
    batched = _dataset(varied, batch_size=6)
    iterator = iter(batched)
    for _ in range(3):
        next(iterator)
    per_sample = _dataset(varied)
    per_sample.load_state_dict(json.loads(json.dumps(batched.state_dict())))
    assert_batches_equal(torch_rlds.collate(reference[18:30]),
                         torch_rlds.collate(list(itertools.islice(per_sample, 12))))
    again = _dataset(varied, batch_size=5)
    again.load_state_dict(per_sample.state_dict())
    assert_batches_equal(torch_rlds.collate(reference[30:35]), next(iter(again)))


def _batched_loader(path, workers, batch_size, **options):
    def make():
        return torch_rlds.DataLoader(_dataset(path, batch_size=batch_size, **options),
                                     batch_size=None, num_workers=workers)
    return make


@pytest.mark.parametrize("workers, batch_size", [(0, 3), (1, 5), (2, 4)])
def test_a_batched_loader_resumes_exactly_and_equals_the_per_sample_one(varied, workers,
                                                                          batch_size):
    num_batches = 3 * sum(VARIED["episode_lengths"]) // batch_size  # about three epochs
    points = None if workers == 0 else [0, 1, 5, num_batches // 2, num_batches - 1]
    reference = assert_resumes_exactly(_batched_loader(varied, workers, batch_size),
                                       num_batches, restore_points=points)
    per_sample = torch_rlds.DataLoader(_dataset(varied), batch_size=batch_size,
                                       num_workers=workers)
    for i, batch in enumerate(itertools.islice(per_sample, num_batches)):
        assert_batches_equal(reference[i], batch, f"batch {i}")


def test_a_one_pass_batched_loader_ends_where_it_should(varied):
    make = _batched_loader(varied, 2, 4, repeat=False)
    count = len(list(make()))
    assert_resumes_exactly(make, count, restore_points=[0, 2, count - 1], ends=True)


def _in_shared_memory(tensor) -> bool:
    """Whether ``tensor``'s memory lies in a shared mapping of this process (its storage is a
    view of the batch's buffer, which torch does not count as shared itself)."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms[3] == "s"
    return False


def test_batches_from_workers_are_in_shared_memory(varied):
    loader = torch_rlds.DataLoader(_dataset(varied, batch_size=4), batch_size=None,
                                   num_workers=1, multiprocessing_context=default_start_method())
    batch = next(iter(loader))
    assert _in_shared_memory(batch["observation"]["image"]) and _in_shared_memory(
        batch["action"])
    assert not _in_shared_memory(next(iter(_dataset(varied, batch_size=4)))["action"])


def _flip_images(sample):
    out = dict(sample)
    out["observation"] = {**sample["observation"],
                          "image": sample["observation"]["image"][:, ::-1].copy()}
    return out


def test_a_sample_transform_applies_to_every_sample_of_a_batch(varied):
    options = dict(repeat=False, sample_transform=_flip_images)
    samples = list(_dataset(varied, **options))
    batches = list(_dataset(varied, batch_size=8, **options))
    for i, (got, chunk) in enumerate(zip(batches, _chunks(samples, 8))):
        assert_batches_equal(torch_rlds.collate(chunk), got, f"batch {i}")


def test_frames_shared_by_samples_are_decoded_once(varied, monkeypatch):
    calls = []
    decode = _images.decode_image

    def counting(data, *args, **kwargs):
        calls.append(data)
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(_images, "decode_image", counting)
    monkeypatch.setattr("torch_rlds._batch.decode_image", counting)
    monkeypatch.setattr("torch_rlds._samples.decode_image", counting)
    frames = sum(VARIED["episode_lengths"]) * len(VARIED["cameras"])
    for options in ({"batch_size": 64}, {}):  # one batch; samples one after another
        calls.clear()
        list(_dataset(varied, obs_window=3, shuffle=False, repeat=False, decode_threads=1,
                      **options))
        assert len(calls) == frames == len(set(calls))


def test_batched_is_a_copy_that_starts_where_the_dataset_would(varied):
    dataset = _dataset(varied)
    state = dataset.state_dict()
    iterator = iter(dataset)
    samples = [next(iterator) for _ in range(10)]
    dataset.load_state_dict(state)
    batched = dataset.batched(4, drop_last=True)
    assert batched.batch_size == 4 and batched.drop_last and dataset.batch_size is None
    assert batched.source is dataset.source
    assert_batches_equal(torch_rlds.collate(samples[:4]), next(iter(batched)))
    assert_batches_equal(samples[0], next(iter(dataset)))  # the original is untouched
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1 \(got -1\)"):
        dataset.batched(-1)


def test_decode_threads_is_checked(varied):
    with pytest.raises(ValueError, match=r"decode_threads must be an int >= 1 \(got 0\)"):
        _dataset(varied, decode_threads=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1 \(got 0\)"):
        _dataset(varied, batch_size=0)


def _failing_on(bad: bytes, real, data, *args, **kwargs):
    if bytes(data) == bad:
        raise ValueError("Corrupt JPEG data: premature end of data segment")
    return real(data, *args, **kwargs)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_frame_that_does_not_decode_fails_its_own_batch(varied, monkeypatch, threads):
    options = dict(shuffle=False, obs_window=1, decode_threads=threads)
    source = torch_rlds.RLDSSource(varied)
    bad = source.episode(3)["steps"]["observation"]["image"].encoded[5]  # sample 17 of 35
    monkeypatch.setattr(_images.simplejpeg, "decode_jpeg",
                        functools.partial(_failing_on, bad, simplejpeg.decode_jpeg))
    iterator = iter(_dataset(varied, batch_size=4, **options))
    for _ in range(4):  # samples 0..15
        next(iterator)
    with pytest.raises(torch_rlds.ImageDecodeError,
                       match=r"tfrecord-00000-of-00002 record 3 @ byte \d+: steps/observation/image\[5\]: JPEG does "
                             r"not decode \(Corrupt JPEG data"):
        next(iterator)
    samples = iter(_dataset(varied, **options))
    assert len(list(itertools.islice(samples, 17))) == 17
    with pytest.raises(torch_rlds.ImageDecodeError, match=r"image\[5\]"):
        next(samples)
