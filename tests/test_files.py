"""torch_rlds._files.write_atomic: the one writer of local files that readers must see whole."""

from __future__ import annotations

import os
import stat

import pytest

from torch_rlds import _files


def test_the_file_is_flushed_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "deep" / "index.bin"
    _files.write_atomic(target, b"abc")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # a cache entry: readable by all
    assert os.listdir(target.parent) == ["index.bin"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "index.bin"
    _files.write_atomic(target, b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        _files.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["index.bin"]


def test_a_named_temporary_is_the_one_renamed(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(src),
                                                         real_replace(src, dst)))
    target = tmp_path / "state.json"
    temporary = tmp_path / ".state.json.tmp-1"
    _files.write_atomic(target, b"{}", temporary=temporary)
    assert renamed == [os.fspath(temporary)]
    assert target.read_bytes() == b"{}" and not temporary.exists()


def test_a_mapped_file_reads_as_its_bytes_holds_no_descriptor_and_is_read_only(tmp_path,
                                                                             monkeypatch):
    from torch_rlds import _files

    path = tmp_path / "index"
    path.write_bytes(bytes(range(256)) * 64)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    maps = [_files.map_regular(str(path), 1 << 20) for _ in range(50)]
    assert all(bytes(m) == path.read_bytes() for m in maps)
    if before is not None:  # fifty maps, no descriptor kept open for them
        assert len(os.listdir("/proc/self/fd")) <= before + 1
    assert isinstance(maps[0], memoryview) and maps[0].readonly
    assert _files.map_regular(str(path), 100) is None  # over the limit
    (tmp_path / "empty").write_bytes(b"")
    assert _files.map_regular(str(tmp_path / "empty"), 100) is None
    monkeypatch.setattr(_files, "_map", lambda fd, size: None)  # no C mmap: read instead
    assert _files.map_regular(str(path), 1 << 20) == path.read_bytes()
