"""The step index: the values of any steps read from their byte ranges equal what TFDS's own
parser gives for the whole record, every range is CRC-checked, and the file form refuses
anything it did not write."""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow_datasets.core import example_parser, utils

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds._step_index import (
    BYTES,
    NotStepAddressable,
    ShardStepIndex,
    decode_values,
    index_record,
    indexed_features,
    verify_blocks,
)


@pytest.fixture(scope="module", params=["synthetic", "bridge", "fractal20220817_data", "droid",
                                        "libero_10_no_noops"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("step_index")
    if request.param == "synthetic":
        spec = synthetic.SyntheticSpec(
            num_episodes=5, val_episodes=0, min_steps=1, max_steps=150, num_shards=1,
            texture=False, cameras=(synthetic.Camera("image", 32, 32), synthetic.Camera(
                "depth", 32, 32, format="png", dtype="uint16", channels=1)))
        return synthetic.write_dataset(root, spec)
    return _published.write_published(root, request.param, num_episodes=3)


def _index(source):
    features = indexed_features(source.features)
    records = [index_record(source.read(e), features) for e in range(len(source))]
    return ShardStepIndex.from_records(features, records,
                                       [len(source.read(e)) for e in range(len(source))])


def test_ranges_hold_the_values_of_their_steps(dataset):
    source = torch_rlds.RLDSSource(dataset)
    index = ShardStepIndex.from_bytes(_index(source).to_bytes())
    parser = example_parser.ExampleParserNp(source.features.get_serialized_info())
    flat_spec = utils.flatten_nest_dict(source.features.get_serialized_info())
    checked = 0
    for e in range(len(source)):
        record = memoryview(source.read(e)).cast("B")
        whole = utils.flatten_nest_dict(parser.parse_example(bytes(record)))
        steps = int(index.num_steps[e])
        for f, feature in enumerate(index.features):
            dtype = flat_spec[feature.name].np_dtype
            ranges = [(a, b) for a, b in [(0, steps - 1), (steps // 2, steps // 2),
                                          (max(0, steps - 3), steps - 1)] if a <= b]
            for first, last in ranges if feature.per_step else [(0, 0)]:
                start, end, blocks = index.byte_range(e, f, first, last)
                data = record[start:end]
                verify_blocks(data, start, blocks, "test")
                values = decode_values(feature, data)
                if not feature.per_step:
                    want = whole[feature.name]
                    got = values[0] if feature.kind == BYTES else np.array(values, dtype)
                    assert np.array_equal(np.asarray(got).reshape(np.shape(want)), want)
                    continue
                held_first, held_last = index.steps_of(e, f, first, last)
                assert held_first <= first and last <= held_last
                rows = np.asarray(whole[feature.name], dtype=object if feature.kind == BYTES
                                  else dtype).reshape(steps, -1)[held_first:held_last + 1]
                if feature.kind == BYTES:
                    assert values == list(rows.reshape(-1))
                else:
                    assert np.array_equal(np.array(values, dtype), rows.reshape(-1))
                checked += 1
    assert checked > 0


def test_a_flipped_byte_in_a_range_fails_its_crc(dataset):
    from torch_rlds import CorruptRecordError

    source = torch_rlds.RLDSSource(dataset)
    index = _index(source)
    record = bytearray(source.read(0))
    f = next(i for i, feat in enumerate(index.features) if feat.per_step)
    start, end, blocks = index.byte_range(0, f, 0, 0)
    record[(start + end) // 2] ^= 0x10
    with pytest.raises(CorruptRecordError, match=r"shard-x: bad CRC of bytes \d+\.\.\d+"):
        verify_blocks(memoryview(record)[start:end], start, blocks, "shard-x")


def test_blocks_are_small_or_one_step_and_small_values_share_them(dataset):
    from torch_rlds._step_index import BLOCK_BYTES

    source = torch_rlds.RLDSSource(dataset)
    index = _index(source)
    for r in range(len(index)):
        steps = int(index.num_steps[r])
        for f, feature in enumerate(index.features):
            if not feature.per_step or steps == 0:
                continue
            k = int(index.block_steps[r, f])
            for block in range(-(-steps // k)):
                first, last = block * k, min(steps, (block + 1) * k) - 1
                start, end, _ = index.byte_range(r, f, first, last)
                # a block of several steps stays within BLOCK_BYTES plus one step's values
                assert k == 1 or end - start <= 2 * BLOCK_BYTES, (feature.name, end - start)
            if feature.name == "steps/is_first" and steps > 1:
                assert k > 1


def test_a_record_without_a_feature_is_not_step_addressable(dataset, tmp_path):
    source = torch_rlds.RLDSSource(dataset)
    features = indexed_features(source.features)
    missing = features + (type(features[0])("steps/not_there", BYTES, True, 1),)
    with pytest.raises(NotStepAddressable, match="steps/not_there is missing"):
        index_record(source.read(0), missing, name="episode 0")


@pytest.mark.parametrize("damage", ["magic", "truncate", "header", "extra"])
def test_the_file_form_refuses_what_it_did_not_write(dataset, damage):
    data = bytearray(_index(torch_rlds.RLDSSource(dataset)).to_bytes())
    if damage == "magic":
        data[:4] = b"XXXX"
    elif damage == "truncate":
        data = data[:-5]
    elif damage == "header":
        data[12:20] = b"{{{{{{{{"
    else:
        data += b"\0" * 8
    with pytest.raises(ValueError, match="where-it-is"):
        ShardStepIndex.from_bytes(bytes(data), "where-it-is")


def test_the_probe_counts_steps_from_a_few_headers(dataset):
    from torch_rlds._step_index import probe_steps

    source = torch_rlds.RLDSSource(dataset)
    features = indexed_features(source.features)
    for e in range(len(source)):
        record = bytes(source.read(e))
        asked = []

        def read(offset, length, record=record, asked=asked):
            asked.append(length)
            return record[offset:offset + length]

        steps, reads = probe_steps(read, len(record), features)
        assert steps == index_record(record, features).num_steps
        assert reads == len(asked) <= 2 + len(features) and max(asked) <= 256


def test_the_probe_counts_bytes_values_when_no_fixed_width_feature_exists(tmp_path):
    from torch_rlds._step_index import probe_steps

    spec = synthetic.SyntheticSpec(num_episodes=2, val_episodes=0, min_steps=4, max_steps=9,
                                   num_shards=1, texture=False)
    source = torch_rlds.RLDSSource(synthetic.write_dataset(tmp_path, spec))
    only_bytes = tuple(f for f in indexed_features(source.features) if f.kind == BYTES)
    record = bytes(source.read(1))
    steps, reads = probe_steps(lambda o, n: record[o:o + n], len(record), only_bytes)
    assert steps == spec.lengths()[1] and reads > steps
