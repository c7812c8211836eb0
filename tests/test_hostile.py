"""Hostile and broken datasets: no code runs, nothing is allocated beyond the declared shapes,
nothing hangs, descriptors stay bounded, no shared memory is left behind, and under
``on_corrupt="skip"`` every healthy episode is still served.

Each case is built in ``tmp_path``; the ones about memory, descriptors or hangs run in a
subprocess under ``RLIMIT_AS`` / ``RLIMIT_NOFILE`` caps and a timeout. ``TORCH_RLDS_LONG=1``
runs the fuzz tests with many more examples.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_rlds
from torch_rlds import _images, synthetic
from torch_rlds._features import EpisodeDecodeError, iter_leaves, load_features
from torch_rlds._info import DatasetFormatError, DatasetInfo, shard_names
from torch_rlds._state_file import write_json_atomic
from torch_rlds._tfrecord import RecordIndex, TFRecordError, write_tfrecord

LONG = os.environ.get("TORCH_RLDS_LONG") == "1"
FUZZ = settings(max_examples=400 if LONG else 40, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TFDS = "tensorflow_datasets.core.features."

# Run in every subprocess: caps on the address space (measured from what the process holds
# after its imports) and on open descriptors.
_PRELUDE = '''
import os, resource, sys
def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
def cap_memory(extra):
    limit = vm_bytes() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def cap_files(n):
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
def open_fds():
    return len(os.listdir("/proc/self/fd"))
'''


def _python(code: str, *, timeout: float = 120, cwd=None, env=None, args=()) -> subprocess.CompletedProcess:
    script = _PRELUDE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory):
    """4 episodes in 2 shards: a 32x32 PNG camera, a uint16 depth PNG, a zlib tensor."""
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("hostile"), synthetic.SyntheticSpec(
            num_episodes=4, num_shards=2, min_steps=3, max_steps=5, texture=False,
            zlib_tensor=True, cameras=(
                synthetic.Camera("image", 32, 32, format="png"),
                synthetic.Camera("depth", 32, 32, format="png", dtype="uint16", channels=1))))


def _copy(path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    path.write_text(json.dumps(data))


def _steps(dataset: torch_rlds.RLDSDataset) -> set[tuple[int, int]]:
    return {(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])) for s in dataset}


def _rewrite_episodes(path: Path, change) -> None:
    """Re-serialize every train episode of the tfrecord dataset at ``path`` after
    ``change(episode_index, parsed)`` edits its parsed (still encoded) features in place."""
    from tensorflow_datasets.core import example_serializer

    source = torch_rlds.RLDSSource(path)
    serializer = example_serializer.ExampleSerializer(source.features.get_serialized_info())
    split = source.info.splits["train"]
    episode = 0
    for shard, count in zip(split.shard_paths, split.shard_lengths):
        index = RecordIndex.load(shard)
        records = []
        for i in range(count):
            parsed = source.decoder._parser.parse_example(index.read(i))
            change(episode, parsed)
            records.append(serializer.serialize_example(parsed))
            episode += 1
        write_tfrecord(shard, records)
    _edit_json(path / "dataset_info.json", lambda d: [s.pop("numBytes", None)
                                                      for s in d["splits"]] and None)


# -- 1. features.json names a class: only TFDS's own are instantiated -----------------------
_EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
class Evil:
    pass
'''


def _plant_evil(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(_EVIL.format(marker=os.fspath(marker)))


def _name_evil(where: str):
    def edit(features: dict) -> None:
        top = features["featuresDict"]["features"]
        if where == "top":
            features["pythonClassName"] = "evil.Evil"
        elif where == "nested":
            obs = top["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"]
            obs["featuresDict"]["features"]["state"]["pythonClassName"] = "evil.Evil"
        elif where == "legacy":
            top["episode_metadata"] = {"type": "evil.Evil", "content": {}}
        elif where == "in a json string":
            top["episode_metadata"] = {
                "pythonClassName": TFDS + "features_dict.FeaturesDict",
                "jsonFeature": {"json": json.dumps({"x": {"type": "evil.Evil", "content": {}}})}}
        elif where == "snake case":
            top["steps"]["python_class_name"] = top["steps"].pop("pythonClassName")
            top["steps"]["python_class_name"] = "evil.Evil"
    return edit


@pytest.mark.parametrize("where", ["top", "nested", "legacy", "in a json string",
                                   "snake case"])
def test_features_json_naming_another_class_imports_nothing(png_dataset, tmp_path, where,
                                                            monkeypatch):
    path = _copy(png_dataset, tmp_path)
    marker = tmp_path / "marker"
    _plant_evil(path, marker)
    _edit_json(path / "features.json", _name_evil(where))
    monkeypatch.syspath_prepend(os.fspath(path))  # evil.py is importable
    source = torch_rlds.RLDSSource(path)
    with pytest.raises(DatasetFormatError, match=r"features\.json: .*'evil\.Evil', which is not "
                                                 r"one of TFDS's own feature classes"):
        source.leaves()
    assert not marker.exists()
    assert "evil" not in sys.modules


def test_inspect_of_a_dataset_with_evil_py_beside_it_runs_nothing(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)
    marker = tmp_path / "marker"
    _plant_evil(path, marker)
    _plant_evil(tmp_path, marker)  # the current directory, which `python -m` puts on sys.path
    _edit_json(path / "features.json", _name_evil("nested"))
    result = subprocess.run([sys.executable, "-m", "torch_rlds", "inspect", "."], cwd=path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [os.fspath(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode != 0
    assert "DatasetFormatError" in result.stderr and "evil.Evil" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "qint8", "V1000000", "float32 ", "string8"])
def test_a_dtype_numpy_does_not_name_is_refused_without_tensorflow(png_dataset, tmp_path, dtype):
    path = _copy(png_dataset, tmp_path)

    def edit(features):
        steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]
        steps["featuresDict"]["features"]["action"]["tensor"]["dtype"] = dtype
    _edit_json(path / "features.json", edit)
    out = _ok(_python(f'''
        import sys
        from torch_rlds._features import load_features
        from torch_rlds._info import DatasetFormatError
        try:
            load_features({os.fspath(path)!r})
        except DatasetFormatError as e:
            print("refused:", e)
        print("tensorflow imported:", any(m.split(".")[0] == "tensorflow" for m in sys.modules))
    '''))
    assert "refused:" in out and "not a dtype torch_rlds reads" in out
    assert "tensorflow imported: False" in out


# -- 2. image bytes open only the declared decoder -------------------------------------------
def _image_bytes(fmt: str, shape=(32, 32, 3), dtype=np.uint8) -> bytes:
    from PIL import Image

    array = np.zeros(shape, dtype)
    if fmt == "JPEG":
        return simplejpeg.encode_jpeg(array)
    if fmt == "EPS":  # Pillow needs Ghostscript to write EPS; the header is what matters
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n" + b" " * 64
    buffer = io.BytesIO()
    Image.fromarray(array if array.shape[-1] != 1 else array[:, :, 0]).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "EPS", "PPM", "ICO", "JPEG"])
def test_a_png_feature_opens_only_pngs(fmt, monkeypatch):
    from PIL import Image

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    data = _image_bytes(fmt)
    with pytest.raises(_images.ImageDecodeError, match="expected PNG|declares PNG images"):
        _images.decode_image(data, (32, 32, 3), np.uint8, format="png", name="frame")
    with pytest.raises(_images.ImageDecodeError):
        _images.check_header(data, (32, 32, 3), "frame", format="png")
    assert opened == []  # no decoder saw the bytes


def test_a_jpeg_feature_opens_only_jpegs_and_pngs_open_only_the_png_plugin(monkeypatch):
    from PIL import Image

    png = _image_bytes("PNG")
    with pytest.raises(_images.ImageDecodeError, match="declares JPEG images, the bytes are a PNG"):
        _images.decode_image(png, (32, 32, 3), np.uint8, format="jpeg")
    formats = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: formats.append(k.get("formats"))
                        or real_open(*a, **k))
    assert _images.decode_image(png, (32, 32, 3), np.uint8, format="png").shape == (32, 32, 3)
    assert formats == [["PNG"]]


def test_frames_of_another_format_are_skipped_and_the_rest_served(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)
    gif = _image_bytes("GIF")

    def change(episode, parsed):
        if episode == 2:
            parsed["steps"]["observation"]["image"][1] = gif
    _rewrite_episodes(path, change)
    with pytest.raises(_images.ImageDecodeError, match="the bytes are a GIF image"):
        torch_rlds.RLDSSource(path).episode(2, decode_images=True)
    served = _steps(torch_rlds.RLDSDataset(path, repeat=False, on_corrupt="skip"))
    expected = _steps(torch_rlds.RLDSDataset(png_dataset, repeat=False))
    assert served == {(e, t) for e, t in expected if e != 2}


# -- 3. bombs --------------------------------------------------------------------------------
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def png_bomb(tmp_path_factory) -> Path:
    """A genuine 13000x13000 RGB PNG of zeros (about 0.5 MB, 507 MB decoded)."""
    side = 13000
    deflate = zlib.compressobj(9)
    row = bytes(1 + 3 * side)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2,
                                                                    0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    path = tmp_path_factory.mktemp("bombs") / "bomb.png"
    path.write_bytes(data)
    return path


def _jpeg_claiming(height: int, width: int) -> bytes:
    """A small JPEG whose frame header claims ``height`` x ``width`` pixels."""
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("shape", [(32, 32, 3), (None, None, 3)], ids=["declared", "open"])
def test_a_png_bomb_fails_on_its_header_within_a_memory_cap(png_bomb, shape):
    out = _ok(_python(f'''
        import numpy as np
        from torch_rlds import _images
        data = open({os.fspath(png_bomb)!r}, "rb").read()
        cap_memory(128 << 20)  # a quarter of what the pixels would take
        for name, call in [("decode", lambda: _images.decode_image(data, {shape!r}, np.uint8,
                                                                   format="png")),
                           ("header", lambda: _images.check_header(data, {shape!r}, "f",
                                                                   format="png"))]:
            try:
                call()
            except _images.ImageDecodeError as e:
                print(name, "refused:", e)
    '''))
    assert out.count("refused:") == 2, out
    if shape[0] is None:
        assert "declares 13000x13000 pixels" in out and "TORCH_RLDS_MAX_VALUE_BYTES" in out
    else:
        assert "height 13000 in the header, 32 declared" in out


def test_a_jpeg_header_claiming_a_huge_frame_is_refused_before_allocating():
    data = _jpeg_claiming(60000, 60000)
    out = _ok(_python(f'''
        import numpy as np
        from torch_rlds import _images
        data = {data!r}
        cap_memory(128 << 20)
        frames = _images.EncodedImages([data], (None, None, 3), np.uint8, "cam", format="jpeg")
        for call in (lambda: frames[0], lambda: _images.decode_image(data, (16, 16, 3), np.uint8,
                                                                     format="jpeg")):
            try:
                call()
            except _images.ImageDecodeError as e:
                print("refused:", e)
    '''))
    assert out.count("refused:") == 2, out
    assert "declares 60000x60000 pixels" in out and "height 60000 in the header, 16" in out


def _zlib_bomb(nbytes: int) -> bytes:
    deflate = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join(deflate.compress(chunk) for _ in range(nbytes >> 20)) + deflate.flush()


def test_a_zlib_tensor_inflates_at_most_to_its_declared_size(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)
    bomb = _zlib_bomb(256 << 20)  # 256 KB inflating to 256 MiB, declared 24 bytes a step

    def change(episode, parsed):
        if episode == 1:
            parsed["steps"]["observation"]["joint_zlib"][0] = bomb
    _rewrite_episodes(path, change)
    out = _ok(_python(f'''
        import torch_rlds
        from torch_rlds._features import EpisodeDecodeError
        source = torch_rlds.RLDSSource({os.fspath(path)!r})
        source.episode(0)
        cap_memory(128 << 20)
        try:
            source.episode(1)
        except EpisodeDecodeError as e:
            print("refused:", e)
        served = torch_rlds.RLDSDataset(source, repeat=False, on_corrupt="skip")
        print("episodes", sorted({{int(s["meta"]["episode_index"]) for s in served}}))
    '''))
    assert "inflates to more than the 24 bytes its declared shape holds" in out
    assert "episodes [0, 2, 3]" in out


def test_a_declared_shape_beyond_the_value_cap_is_refused_at_load(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)

    def edit(features):
        steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]
        image = steps["featuresDict"]["features"]["observation"]["featuresDict"]["features"][
            "image"]["image"]
        image["shape"]["dimensions"] = ["65535", "65535", "3"]
    _edit_json(path / "features.json", edit)
    with pytest.raises(DatasetFormatError, match=r"steps/observation/image: declared shape "
                                                 r"\(65535, 65535, 3\) of uint8 is 12884508675 "
                                                 r"bytes, more than the 268435456"):
        torch_rlds.RLDSDataset(path)


def test_a_batch_beyond_the_batch_cap_is_refused_before_its_buffer(png_dataset, monkeypatch):
    monkeypatch.setenv("TORCH_RLDS_MAX_BATCH_BYTES", str(1 << 20))
    loader = torch_rlds.DataLoader(torch_rlds.RLDSDataset(png_dataset), batch_size=512)
    with pytest.raises(ValueError, match=r"more than the 1048576 bytes torch_rlds allocates "
                                         r"for one \(lower batch_size"):
        next(iter(loader))


def _shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/torch_*"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_a_failed_shared_memory_allocation_leaves_no_file():
    from torch_rlds import _buffers

    before = _shm_files()
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(RuntimeError, match=r"does not fit in /dev/shm"):
        _buffers.new_shared(free + (1 << 30))
    # torch's own failure (refused by the kernel, not by the size check) leaves nothing either:
    # a file-size cap makes its resize fail without taking any memory.
    out = _ok(_python('''
        import glob, os, resource, signal
        from torch_rlds import _buffers
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            _buffers.new_shared(64 << 20)
        except RuntimeError as e:
            print("refused:", str(e)[:200])
        print("left", sorted(glob.glob(f"/dev/shm/torch_{os.getpid()}_*")))
    '''))
    assert "refused:" in out and "left []" in out, out
    assert _shm_files() <= before


# -- 4. shard paths stay inside the dataset; messages never echo bytes ----------------------
@pytest.mark.parametrize("field, value", [
    ("filepathTemplate", "../outside/{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"),
    ("filepathTemplate", "/etc/{SHARD_INDEX}"),
    ("filepathTemplate", "a/../../{SHARD_INDEX}"),
    ("filepathTemplate", "{DATASET:>1000000000}"),
    ("filepathTemplate", "{DATASET.__class__}"),
    ("filepathTemplate", "{SPLIT!r}-{SHARD_INDEX}"),
    ("name", "../../etc"),
    ("split", ".."),
])
def test_shard_paths_must_stay_inside_the_dataset(png_dataset, tmp_path, field, value):
    path = _copy(png_dataset, tmp_path)

    def edit(info):
        if field == "name":
            info["name"] = value
        elif field == "split":
            info["splits"][0].update(name=value, filepathTemplate="{SPLIT}/{SHARD_X_OF_Y}")
        else:
            info["splits"][0]["filepathTemplate"] = value
    _edit_json(path / "dataset_info.json", edit)
    with pytest.raises(DatasetFormatError, match=r"dataset_info\.json: ") as raised:
        DatasetInfo.load(path)
    assert len(str(raised.value)) < 600


def test_shard_names_are_those_tfds_gives():
    from tensorflow_datasets.core import naming

    for template in ("{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                     "data/{SPLIT}-{SHARD_INDEX}-of-{NUM_SHARDS}.{FILEFORMAT}"):
        for shards in (1, 3, 123456):
            ours = shard_names(template, "bridge", "train", "tfrecord", shards, "here")
            theirs = naming.ShardedFileTemplate(
                data_dir=Path("/d"), template=template, dataset_name="bridge", split="train",
                filetype_suffix="tfrecord")
            assert len(ours) == shards
            for i in {0, shards // 2, shards - 1}:
                path = theirs.sharded_filepath(shard_index=i, num_shards=shards)
                assert ours[i] == os.path.relpath(os.fspath(path), "/d")


def test_a_file_that_is_not_a_tfrecord_is_named_without_its_bytes(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)
    secret = b"PASSWORD=hunter2 and more secret text that is no tfrecord at all\n" * 4
    shard = sorted(path.glob("*.tfrecord-*"))[0]
    shard.write_bytes(secret)
    with pytest.raises(TFRecordError) as raised:
        torch_rlds.RLDSSource(path)
    message = str(raised.value)
    assert shard.name in message and "offset 0" in message
    for leak in (str(int.from_bytes(secret[:8], "little")), "hunter2", "PASSWORD",
                 f"{int.from_bytes(secret[8:12], 'little'):#010x}"):
        assert leak not in message


# -- 6. array_record datasets through the DataLoader, every start method ---------------------
_LOADER_SCRIPT = '''
import itertools, sys
import torch_rlds

def main():
    path, method = sys.argv[1], sys.argv[2]
    expected = None
    for workers in (0, 1, 2):
        if workers == 0 and method != "fork":
            continue
        dataset = torch_rlds.RLDSDataset(path, repeat=False, shuffle_window=2)
        dataset.source.episode(0)  # the main process has read before the workers start
        loader = torch_rlds.DataLoader(dataset, batch_size=3, num_workers=workers,
                                       multiprocessing_context=method if workers else None)
        steps = sorted((int(e), int(t)) for b in loader
                       for e, t in zip(b["meta"]["episode_index"], b["meta"]["step_index"]))
        expected = expected or steps
        print(method, workers, len(steps), steps == expected, flush=True)

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def array_record_dataset(tmp_path_factory):
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("ar"), synthetic.SyntheticSpec(
            file_format="array_record", num_episodes=6, num_shards=3, min_steps=3, max_steps=6,
            texture=False, cameras=(synthetic.Camera("image", 32, 32),)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_array_record_through_the_loader_under_every_start_method(array_record_dataset, tmp_path,
                                                                   method):
    script = tmp_path / "load.py"
    script.write_text(_LOADER_SCRIPT)
    lengths = synthetic.SyntheticSpec(num_episodes=6, min_steps=3, max_steps=6).lengths()[:6]
    result = subprocess.run([sys.executable, os.fspath(script), os.fspath(array_record_dataset),
                             method], capture_output=True, text=True, timeout=240)
    out = _ok(result)
    runs = [line.split() for line in out.splitlines() if line.startswith(method)]
    assert [int(r[1]) for r in runs] == ([0, 1, 2] if method == "fork" else [1, 2])
    assert all(int(r[2]) == sum(lengths) and r[3] == "True" for r in runs), out


def test_the_array_record_helper_ends_with_its_process(array_record_dataset):
    import time

    script = _PRELUDE + textwrap.dedent(f'''
        import os, signal
        import torch_rlds
        from torch_rlds import _array_record
        source = torch_rlds.RLDSSource({os.fspath(array_record_dataset)!r})
        print("steps", len(source.episode(5)["steps"]["action"]))
        print("helper", _array_record._helper._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -9 and "steps " in result.stdout, result.stderr[-3000:]
    helper = int(result.stdout.split("helper ")[1].split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(helper):
        time.sleep(0.05)
    assert not _running(helper)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- 7. descriptors stay bounded --------------------------------------------------------------
@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """2,000 shards of one short episode each."""
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("many"), synthetic.SyntheticSpec(
            num_episodes=2000, num_shards=2000, min_steps=1, max_steps=2, texture=False,
            cameras=(synthetic.Camera("image", 32, 32),)))


@pytest.mark.slow
def test_two_epochs_of_2000_shards_under_256_descriptors(many_shards):
    out = _ok(_python(f'''
        import itertools
        import torch_rlds
        cap_files(256)
        path = {os.fspath(many_shards)!r}
        dataset = torch_rlds.RLDSDataset(path, repeat=False, decode_threads=4)
        for epoch in range(2):
            print("epoch", epoch, len({{int(s["meta"]["episode_index"]) for s in dataset}}))
        print("fds after the main process read", open_fds())
        loader = torch_rlds.DataLoader(torch_rlds.RLDSDataset(path, repeat=False), batch_size=64,
                                       num_workers=2)
        for epoch in range(2):
            seen = {{int(e) for b in loader for e in b["meta"]["episode_index"]}}
            print("loader epoch", epoch, len(seen))
    ''', timeout=600))
    assert out.count(" 2000\n") == 4, out
    fds = int(out.split("fds after the main process read ")[1].split()[0])
    assert fds < 128, out


def test_the_descriptor_cache_holds_a_bounded_number_whatever_the_threads(tmp_path, monkeypatch):
    import concurrent.futures

    from torch_rlds import _files

    monkeypatch.setattr(_files, "_descriptors", _files.SharedDescriptors(8))
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"s{i}.tfrecord")
        write_tfrecord(paths[-1], [bytes([i]) * (10 + i), b"x" * 7])
    indexes = [RecordIndex.load(p) for p in paths]
    peak = []

    def read(k):
        index = indexes[k % len(indexes)]
        assert index.read(0) == bytes([k % len(indexes)]) * (10 + k % len(indexes))
        peak.append(_files.descriptors().open_count())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(read, range(2000)))
    assert max(peak) <= 8 + 16 and _files.descriptors().open_count() <= 8


# -- 9. special files never hang and are never read whole ------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_shard_that_is_not_a_regular_file_is_refused(png_dataset, tmp_path, kind):
    path = _copy(png_dataset, tmp_path)
    shard = sorted(path.glob("*.tfrecord-*"))[0]
    shard.unlink()
    {"fifo": lambda: os.mkfifo(shard), "dev-zero": lambda: shard.symlink_to("/dev/zero"),
     "folder": lambda: shard.mkdir()}[kind]()
    out = _ok(_python(f'''
        import torch_rlds
        from torch_rlds._info import DatasetFormatError
        try:
            torch_rlds.RLDSSource({os.fspath(path)!r})
        except DatasetFormatError as e:
            print("refused:", e)
    ''', timeout=60))
    assert "refused:" in out and "not a regular file" in out


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
def test_a_cached_index_that_is_not_a_plain_file_is_rebuilt(png_dataset, tmp_path, kind):
    cache = tmp_path / "cache"
    env = {"TORCH_RLDS_CACHE": os.fspath(cache)}
    code = f'''
        import torch_rlds
        source = torch_rlds.RLDSSource({os.fspath(png_dataset)!r})
        cap_memory(512 << 20)
        print("episodes", len(source), len(source.episode(3)["steps"]["action"]))
    '''
    _ok(_python(code, env=env))
    cached = sorted((cache / "index").glob("*.npy"))
    assert len(cached) == 2
    for file in cached:
        file.unlink()
        if kind == "fifo":
            os.mkfifo(file)
        elif kind == "dev-zero":
            file.symlink_to("/dev/zero")
        else:
            with open(file, "wb") as f:
                f.truncate(8 << 30)
    out = _ok(_python(code, env=env, timeout=60))
    assert out.startswith("episodes 4 ")


# -- 10. a stale index cache is rebuilt ------------------------------------------------------
def test_a_rewritten_shard_with_the_same_size_and_mtime_is_reindexed(tmp_path):
    path = tmp_path / "data.tfrecord"
    write_tfrecord(path, [b"a" * 50, b"b" * 60])
    stat = path.stat()
    assert RecordIndex.load(path).offsets.tolist() == [0, 66, 142]
    write_tfrecord(path, [b"b" * 60, b"a" * 50])  # other records, the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = RecordIndex.load(path)
    assert index.offsets.tolist() == [0, 76, 142]
    assert index.read(1) == b"a" * 50


def test_healthy_episodes_survive_a_shard_rewritten_behind_the_cache(write_dataset, tmp_path):
    original = write_dataset(num_episodes=4, num_shards=1, min_steps=4, max_steps=12,
                             texture=True, cameras=(synthetic.Camera("image"),))
    path = _copy(original, tmp_path)
    shard = next(path.glob("*.tfrecord-*"))
    records = [RecordIndex.load(shard).read(i) for i in range(4)]
    assert len(records[1]) != len(records[2]) and min(map(len, records)) > 8192
    expected = _steps(torch_rlds.RLDSDataset(path, repeat=False))
    stat = shard.stat()
    # The middle records swap: the size, the mtime and the first and last 4 KiB stay.
    write_tfrecord(shard, [records[0], records[2], records[1], records[3]])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    source = torch_rlds.RLDSSource(path)
    assert bytes(source.read(1)) == records[2] and bytes(source.read(2)) == records[1]
    served = _steps(torch_rlds.RLDSDataset(path, repeat=False, on_corrupt="skip"))
    assert len(served) == len(expected)


def test_a_damaged_record_is_reindexed_once_and_its_error_stands(png_dataset, tmp_path,
                                                                 monkeypatch):
    path = _copy(png_dataset, tmp_path)
    source = torch_rlds.RLDSSource(path)
    shard = source.info.splits["train"].shard_paths[0]
    offset = int(source._readers["train"].indexes[0].offsets[1]) + 40
    with open(shard, "r+b") as f:  # a payload byte of episode 1
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    loads = []
    real_load = RecordIndex.load.__func__
    monkeypatch.setattr(RecordIndex, "load", classmethod(
        lambda cls, *a, **k: loads.append(k.get("rebuild")) or real_load(cls, *a, **k)))
    for _ in range(3):
        with pytest.raises(TFRecordError, match="bad payload CRC of record 1"):
            source.read(1)
    assert loads == [True]
    source.read(0)


# -- 11. every content defect is a named error the skip policy covers -----------------------
@pytest.mark.parametrize("order", ["window", "global"])
def test_content_defects_are_named_errors_and_skip_serves_the_rest(png_dataset, tmp_path,
                                                                   order):
    path = _copy(png_dataset, tmp_path)

    def change(episode, parsed):
        steps = parsed["steps"]["observation"]
        if episode == 0:
            steps["joint_zlib"][1] = zlib.compress(b"1234567")  # 7 bytes of float64
        elif episode == 2:
            steps["joint_zlib"][0] = _zlib_bomb(64 << 20)
        elif episode == 3:
            steps["image"] = steps["image"][:-1]  # a step short of the others
    _rewrite_episodes(path, change)
    source = torch_rlds.RLDSSource(path)
    messages = {
        0: "7 bytes are not a whole number of float64 values",
        2: "inflates to more than the 24 bytes",
        3: "steps/observation/image has",
    }
    for episode, message in messages.items():
        with pytest.raises(EpisodeDecodeError, match=message):
            source.episode(episode)
    served = torch_rlds.RLDSDataset(path, repeat=False, on_corrupt="skip", order=order)
    steps = _steps(served)
    assert {e for e, _ in steps} == {1}
    if order == "window":  # the corrupt episodes are left out
        assert served.state_dict()["skipped"] == 3
    else:  # each of their samples is replaced by a healthy one: the epoch keeps its size
        healthy = len(source.episode(1)["steps"]["is_first"])
        assert served.state_dict()["skipped"] >= served.num_steps - healthy


def test_a_feature_missing_from_every_record_is_named(png_dataset, tmp_path):
    path = _copy(png_dataset, tmp_path)

    def edit(features):
        steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]
        steps["featuresDict"]["features"]["extra"] = {
            "pythonClassName": TFDS + "tensor_feature.Tensor",
            "tensor": {"dtype": "float32", "encoding": "none", "shape": {"dimensions": ["2"]}}}
    _edit_json(path / "features.json", edit)
    with pytest.raises(EpisodeDecodeError, match="feature steps/extra"):
        torch_rlds.RLDSSource(path).episode(0)


# -- 12. PNG bit depth against the declared dtype -------------------------------------------
def test_a_png_of_another_bit_depth_than_declared_is_an_error():
    eight = _image_bytes("PNG", (32, 32, 1))
    sixteen = _image_bytes("PNG", (32, 32, 1), np.uint16)
    with pytest.raises(_images.ImageDecodeError, match="a 16-bit PNG where the feature declares "
                                                       "uint8"):
        _images.decode_image(sixteen, (32, 32, 1), np.uint8, format="png")
    with pytest.raises(_images.ImageDecodeError, match="an? 8-bit PNG where the feature declares "
                                                       "uint16"):
        _images.decode_image(eight, (32, 32, 1), np.uint16, format="png")
    frames = _images.EncodedImages([eight, sixteen], (32, 32, 1), np.uint16, "depth", "png")
    with pytest.raises(_images.ImageDecodeError, match=r"depth\[0\]: an? 8-bit PNG"):
        frames.check_headers()
    assert _images.decode_image(sixteen, (32, 32, 1), np.uint16, format="png").dtype == np.uint16


# -- 13. two processes saving to one path ----------------------------------------------------
def test_two_processes_saving_to_one_path_each_succeed(tmp_path):
    path = tmp_path / "state.json"
    code = f'''
        import sys
        from etils import epath
        from torch_rlds._state_file import write_json_atomic
        writer = int(sys.argv[1])
        for i in range(300):
            write_json_atomic(epath.Path({os.fspath(path)!r}), {{"writer": writer, "i": i,
                                                                "pad": "x" * 4000}})
        print("done", writer)
    '''
    script = _PRELUDE + textwrap.dedent(code)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            state = json.loads(path.read_text())  # always one whole state
            assert state["pad"] == "x" * 4000
            reads += 1
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_temporary_of_a_live_process_is_left_alone(tmp_path):
    from etils import epath

    path = epath.Path(tmp_path / "state.json")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = __import__("torch_rlds._state_file", fromlist=["_host"])._host()
        live = tmp_path / f".state.json.tmp-{other.pid}-{'0' * 32}@{host}"
        live.write_text("{")
        dead = tmp_path / f".state.json.tmp-{2 ** 22 + 12345}-{'1' * 32}@{host}"
        dead.write_text("{")
        write_json_atomic(path, {"a": 1})
        assert live.exists() and not dead.exists()
    finally:
        other.kill()
        other.wait()


# -- 14. an unwritable cache folder: the index lives in memory, one warning -------------------
def test_an_unwritable_cache_warns_once_and_datasets_stay_readable(png_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = _ok(_python(f'''
        import warnings
        import torch_rlds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                source = torch_rlds.RLDSSource({os.fspath(png_dataset)!r})
                print("episodes", len(source), len(source.episode(3)["steps"]["action"]))
        print("warnings", sum("cannot write record indexes" in str(w.message) for w in caught))
    ''', env={"TORCH_RLDS_CACHE": os.fspath(blocker / "cache")}))
    assert out.count("episodes 4 ") == 2 and "warnings 1" in out, out


# -- fuzz: metadata files and loader states ---------------------------------------------------
def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
    | st.text(max_size=20), _containers, max_leaves=12)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _mutate(tree, data):
    """``tree`` with one node (drawn by ``data``) replaced by arbitrary JSON or removed."""
    tree = json.loads(json.dumps(tree))
    paths = list(_paths(tree))
    where = data.draw(st.sampled_from(paths))
    value = data.draw(_json | st.sampled_from(["evil.Evil", TFDS + "image_feature.Image",
                                               "bfloat16", "-1", "99999999999", "../x"]))
    if not where:
        return value
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    return tree


class _NoTensorflow:
    """A meta path finder that records, and refuses, any import of tensorflow."""

    def __init__(self):
        self.asked = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            self.asked.append(name)
            raise ImportError("tensorflow is not to be imported here")
        return None


@pytest.fixture
def no_tensorflow(monkeypatch, tmp_path):
    from etils import epath

    epath.Path(tmp_path).exists()  # etils asks once whether tensorflow exists; not an import
    finder = _NoTensorflow()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    yield finder
    assert finder.asked == []


@FUZZ
@given(data=st.data())
def test_fuzz_features_json(png_dataset, tmp_path, no_tensorflow, data):
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    features = json.loads((Path(png_dataset) / "features.json").read_text())
    (folder / "features.json").write_text(json.dumps(_mutate(features, data)))
    try:
        leaves = list(iter_leaves(load_features(folder)))
    except (DatasetFormatError, EpisodeDecodeError):
        return
    for leaf in leaves:  # what loads is what the decoder can lay out within the caps
        assert leaf.kind in ("image", "text", "tensor")
        assert all(d is None or d >= 0 for d in leaf.shape)


@FUZZ
@given(data=st.data())
def test_fuzz_dataset_info_json(png_dataset, tmp_path, no_tensorflow, data):
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    shutil.copy(Path(png_dataset) / "features.json", folder / "features.json")
    info = json.loads((Path(png_dataset) / "dataset_info.json").read_text())
    (folder / "dataset_info.json").write_text(json.dumps(_mutate(info, data)))
    try:
        loaded = DatasetInfo.load(folder)
    except DatasetFormatError:
        return
    for split in loaded.splits.values():
        for shard in split.shard_paths:
            assert os.path.normpath(os.fspath(shard)).startswith(os.fspath(folder) + os.sep)


@pytest.fixture(scope="module")
def loader_state(png_dataset):
    loader = torch_rlds.DataLoader(torch_rlds.RLDSDataset(png_dataset, shuffle_window=2),
                                   batch_size=2)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    return json.loads(json.dumps(loader.state_dict()))


@FUZZ
@given(data=st.data())
def test_fuzz_loader_state(png_dataset, loader_state, data):
    loader = torch_rlds.DataLoader(torch_rlds.RLDSDataset(png_dataset, shuffle_window=2),
                                   batch_size=2)
    with contextlib.suppress(ValueError):  # loads, or names what is wrong
        loader.load_state_dict(_mutate(loader_state, data))
