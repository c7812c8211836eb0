"""The loader's batches: made by the dataset, equal to collated samples; worker buffers reused
once the main process is done with them, and never while it holds any part of a batch; each
field a tensor of its own, and a kept field keeps only its own pages."""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pytest
import torch

import torch_rlds
from torch_rlds import _buffers, _fields
from torch_rlds.testing import assert_batches_equal


def _dataset(path, **options):
    return torch_rlds.RLDSDataset(path, **{"obs_window": 2, "action_horizon": 4,
                                           "shuffle_window": 2, **options})


def _buffer(tensor: torch.Tensor) -> np.ndarray:
    """The buffer a field of a batch from a worker lies in, as this process mapped it."""
    address = tensor.untyped_storage().data_ptr()
    mapped = [entry[0] for table in _buffers._mapped.values() for entry in table.values()]
    for base in mapped + [batch._base() for batch in _fields._loose]:
        if base is not None and 0 <= address - base.ctypes.data < base.nbytes:
            return base
    raise AssertionError("the field lies in no buffer this process knows")


def _header(batch) -> list[int]:
    """The pool header at the front of the batch's buffer: magic, token, worker, slot, seq."""
    return _buffer(batch["action"])[:40].view(np.int64).tolist()


def _offset(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() - _buffer(tensor).ctypes.data


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    return list(tree) if isinstance(tree, list) else tree


# -- the dataset makes the loader's batches -------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_batches_are_the_collated_samples(small_dataset, workers, drop_last):
    dataset = _dataset(small_dataset, repeat=False)
    loader = torch_rlds.DataLoader(dataset, batch_size=4, num_workers=workers,
                                   drop_last=drop_last)
    by_samples = torch_rlds.DataLoader(_dataset(small_dataset, repeat=False), batch_size=4,
                                       num_workers=workers, drop_last=drop_last,
                                       collate_fn=torch_rlds.collate)
    assert (loader.batch_size, loader.drop_last) == (4, drop_last)
    assert loader.dataset.batch_size == 4 and dataset.batch_size is None
    assert by_samples.dataset is not None and by_samples.dataset.batch_size is None
    got, expected = list(loader), list(by_samples)
    assert len(got) == len(expected) > 2
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_batches_equal(b, a, f"batch {i}")
    sizes = [len(b["action"]) for b in got]
    steps = sum(1 for _ in _dataset(small_dataset, repeat=False))
    # Without drop_last every step is served, in full batches but for each worker's last.
    assert min(sizes) == 4 if drop_last else sum(sizes) == steps
    assert sum(size < 4 for size in sizes) <= (0 if drop_last else max(workers, 1))


def test_a_loader_batched_state_resumes_a_sample_collating_loader(small_dataset):
    by_samples = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                       collate_fn=torch_rlds.collate)
    it = iter(by_samples)
    for _ in range(3):
        next(it)
    state = by_samples.state_dict()
    expected = [next(it) for _ in range(2)]
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2)
    loader.load_state_dict(state)
    for i, batch in enumerate(itertools.islice(loader, 2)):
        assert_batches_equal(expected[i], batch, f"batch {i}")


# -- buffers reused by workers -------------------------------------------------------------
def test_workers_write_batches_into_the_same_few_buffers(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2)
    headers = [_header(batch) for batch in itertools.islice(loader, 40)]
    assert {h[0] for h in headers} == {_buffers.MAGIC}
    slots = {(h[2], h[3]) for h in headers}
    assert all(slot >= 0 for _, slot in slots)
    assert len(slots) <= 2 * (loader.prefetch_factor + 3)
    per_worker = {w: [h[4] for h in headers if h[2] == w] for w in (0, 1)}
    assert all(len(seqs) == 20 and seqs == sorted(seqs) for seqs in per_worker.values())


def test_without_reuse_each_batch_has_a_buffer_of_its_own(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                   reuse_buffers=False)
    reference = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2)
    for i, (a, b) in enumerate(zip(itertools.islice(loader, 12), reference)):
        assert _header(a)[0] != _buffers.MAGIC
        assert _offset(a["observation"]["image"]) == 0  # the buffer's first tensor
        assert _offset(b["observation"]["image"]) == _buffers.HEADER
        assert_batches_equal(b, a, f"batch {i}")


@pytest.mark.parametrize("keep", ["batch", "numpy", "one_view"])
def test_a_batch_the_caller_holds_is_never_written_over(small_dataset, keep):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                   as_numpy=keep == "numpy")
    kept = []
    for i, batch in enumerate(itertools.islice(loader, 36)):
        if i % 3:
            continue  # dropped: its buffer goes back to its worker
        if keep == "one_view":
            view = batch["observation"]["image"][1:, 0]  # a view keeps the whole buffer
            kept.append((view, view.clone()))
        else:
            kept.append((batch, _clone(batch)))
    assert len(kept) == 12
    for i, (held, copy) in enumerate(kept):
        if keep == "one_view":
            assert torch.equal(held, copy), f"kept view {i} changed"
        else:
            assert_batches_equal(copy, held, f"kept batch {i}")


def test_reuse_gives_the_same_stream_for_a_mixture(small_dataset, write_dataset):
    from torch_rlds import synthetic

    other = write_dataset(num_episodes=5, min_steps=2, max_steps=9, num_shards=1,
                          cameras=(synthetic.Camera("image"), synthetic.Camera("wrist_image",
                                                                               32, 48)),
                          name="other_rlds")

    def mixture():
        return torch_rlds.MixtureDataset([_dataset(small_dataset), _dataset(other)],
                                         weights=[0.5, 0.5], seed=3)

    reused = torch_rlds.DataLoader(mixture(), batch_size=4, num_workers=2)
    fresh = torch_rlds.DataLoader(mixture(), batch_size=4, num_workers=2, reuse_buffers=False)
    headers = []
    for i, (a, b) in enumerate(zip(itertools.islice(reused, 20), fresh)):
        assert_batches_equal(b, a, f"batch {i}")
        headers.append(_header(a))
    assert {h[0] for h in headers} == {_buffers.MAGIC}
    assert len({(h[2], h[3]) for h in headers}) < len(headers)  # slots came back


def test_reuse_with_forkserver_workers(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                   multiprocessing_context="forkserver")
    reference = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                      reuse_buffers=False)
    headers = []
    for i, (a, b) in enumerate(zip(itertools.islice(loader, 16), reference)):
        assert_batches_equal(b, a, f"batch {i}")
        headers.append(_header(a))
    assert {h[0] for h in headers} == {_buffers.MAGIC}
    assert len({(h[2], h[3]) for h in headers}) < len(headers)


# -- the pool and the leases, in one process ----------------------------------------------
def _as_main_sees_it(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """Another mapping of ``storage``'s shared memory, as the main process holds it."""
    fd, size = storage._share_fd_cpu_()
    return torch.UntypedStorage._new_shared_fd_cpu(os.dup(fd), size)


def test_a_worker_with_no_free_slot_allocates_a_buffer_of_its_own():
    leases = _buffers.Leases(1, 2)
    pool = _buffers.WorkerBuffers(*leases.worker_args(), worker=0)
    a, b, c = (pool.take(100) for _ in range(3))
    flags = leases.flags[0].tolist()
    assert flags == [1, 2]
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    header = torch.empty(0, dtype=torch.int64).set_(c, 0, (5,)).tolist()
    assert header == [_buffers.MAGIC, leases.token, 0, -1, 3]
    leases.flags[0, 0] = 0  # the main process freed slot 0
    d = pool.take(100)
    assert d.data_ptr() == a.data_ptr() and leases.flags[0].tolist() == [4, 2]
    leases.flags[0, 1] = 0
    e = pool.take(10_000)  # larger than slot 1's buffer: a new one in its place
    assert e.nbytes() >= _buffers.HEADER + 10_000 and e.data_ptr() != b.data_ptr()
    assert leases.flags[0].tolist() == [4, 5]


def _arrive(buffer: torch.UntypedStorage, views, skeleton):
    """A batch as the main process unpickles it when it brings its buffer's handle."""
    main = _as_main_sees_it(buffer)
    whole = torch.empty(0, dtype=torch.uint8).set_(main, 0, (main.nbytes(),))
    return _buffers._unpack(whole, views, skeleton)


VIEWS = [(torch.float32, (4, 4), (4, 1), 16)]  # one float tensor after the 64-byte header
SKELETON = _buffers._Tree(dict, [("action", _buffers._View(0)), ("text", ["a", "b"])])


def test_only_containers_that_hold_buffer_views_are_rebuilt():
    storage = torch.UntypedStorage(_buffers.HEADER + 64)
    action = torch.empty(0).set_(storage, _buffers.HEADER // 4, (4, 4))
    text, meta = ["a", "b"], {"names": ("x",), "ids": [1, 2]}
    batch = {"action": action, "text": text, "meta": meta, "pair": (action[0], [action[1]])}
    views, base = [], []
    skeleton = _buffers._strip(batch, base, views)
    assert len(base) == 1 and base[0].data_ptr() == storage.data_ptr()
    assert len(views) == 3
    items = dict(skeleton.items)
    assert items["text"] is text and items["meta"] is meta  # sent as they are
    assert type(items["pair"]) is _buffers._Tree and items["pair"].kind is tuple
    whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
    rebuilt = _buffers._put(skeleton, _fields.split(whole.numpy(), views, loose=False)[0])
    assert rebuilt["text"] == text and rebuilt["meta"] == meta
    assert type(rebuilt["pair"]) is tuple and type(rebuilt["pair"][1]) is list
    assert torch.equal(rebuilt["pair"][1][0], action[1])
    assert rebuilt["action"].data_ptr() == action.data_ptr()  # no copy...
    assert rebuilt["action"].untyped_storage().nbytes() == 64  # ...and a storage of its own


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_leases_free_a_buffer_only_when_nothing_holds_it():
    leases = _buffers.Leases(1, 2)
    pool = _buffers.WorkerBuffers(*leases.worker_args(), worker=0)
    buffer = pool.take(64)
    assert pool.mapped(buffer) is None  # the first batch in a slot brings the handle
    batch = _arrive(buffer, VIEWS, SKELETON)
    assert batch["text"] == ["a", "b"] and batch["action"].shape == (4, 4)
    assert leases.release() == 0 and leases.flags[0, 0] == 1
    array = batch["action"].numpy()
    storage = batch["action"].untyped_storage()
    del batch
    assert leases.release() == 0  # a numpy view still holds it
    del array
    assert leases.release() == 0  # so does the storage object alone
    typed = torch.empty(0, dtype=torch.float32).set_(storage, 0, (4,)).storage()
    del storage
    assert leases.release() == 0  # and a TypedStorage of it
    del typed
    assert leases.release() == 1 and leases.flags[0, 0] == 0
    assert pool.take(64) is buffer  # the worker's next batch goes into slot 0...
    assert leases.release() == 0 and leases.flags[0, 0] == 2  # ...not yet received here
    assert pool.mapped(buffer) == 0  # and crosses by name
    again = _buffers._unpack_mapped(leases.token, 0, 0, VIEWS, SKELETON)
    torch.empty(0, dtype=torch.float32).set_(buffer, 16, (16,)).copy_(torch.arange(16.0))
    assert again["action"].flatten().tolist() == list(range(16))  # the same memory
    del again
    assert leases.release() == 1 and leases.flags[0, 0] == 0


def test_a_batch_by_name_needs_its_buffer_mapped():
    leases = _buffers.Leases(1, 1)
    with pytest.raises(RuntimeError, match="worker 0 came in buffer slot 0, which this "
                                           "process never received"):
        _buffers._unpack_mapped(leases.token, 0, 0, VIEWS, SKELETON)
    token = leases.token
    del leases
    with pytest.raises(RuntimeError, match="never received"):
        _buffers._unpack_mapped(token, 0, 0, VIEWS, SKELETON)


def test_leases_free_only_their_own_slots():
    leases = _buffers.Leases(2, 2)
    other = _buffers.Leases(2, 2)
    pool = _buffers.WorkerBuffers(*other.worker_args(), worker=1)
    foreign = _arrive(pool.take(64), VIEWS, SKELETON)
    assert leases.release() == 0 and leases.flags.sum() == 0
    del foreign
    assert other.release() == 1 and other.flags[1, 0] == 0


_HANDLES: list[int] = []
_REBUILD = torch.multiprocessing.reductions.rebuild_storage_fd


def _counting_rebuild(*args):
    """torch's rebuild of a storage from a handle, counted (a module-level function: workers
    pickle it by name, the main process runs it)."""
    _HANDLES.append(1)
    return _REBUILD(*args)


@pytest.mark.parametrize("reuse", [True, False])
def test_a_batch_crosses_as_one_handle_or_by_name(small_dataset, monkeypatch, reuse):
    reference = list(itertools.islice(torch_rlds.DataLoader(
        _dataset(small_dataset), batch_size=3, num_workers=2, collate_fn=torch_rlds.collate,
        reuse_buffers=False), 30))
    monkeypatch.setattr(torch.multiprocessing.reductions, "rebuild_storage_fd",
                        _counting_rebuild)
    _HANDLES.clear()
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                   reuse_buffers=reuse)
    for i, batch in enumerate(itertools.islice(loader, 30)):
        assert_batches_equal(reference[i], batch, f"batch {i}")
    if reuse:  # a handle for each slot a worker filled, then the slot's name
        assert 2 <= len(_HANDLES) <= 2 * (loader.prefetch_factor + 3)
    else:  # one handle a batch (torch alone would send one per tensor); a batch that
        # arrived ahead of its turn is unpickled already, and brought its handle too
        assert 30 <= len(_HANDLES) <= 30 + 2 * loader.prefetch_factor


@pytest.mark.parametrize("collate", [None, torch_rlds.collate])
def test_slots_come_back_after_a_restore_between_snapshots(small_dataset, collate):
    # torchdata replays the batches since the last snapshot without handing them out: their
    # slots must come back all the same, or every later batch needs a fresh buffer.
    def make():
        return torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=2,
                                     snapshot_every_n_steps=20, collate_fn=collate)

    first = make()
    reference = list(itertools.islice(first, 53))
    state = first.state_dict()
    assert state["_steps_since_snapshot"] > 5
    del first
    loader = make()
    loader.load_state_dict(state)
    headers = []
    for i, batch in enumerate(itertools.islice(loader, 40)):
        if i < 3:
            assert batch["meta"]["step_index"].tolist() != []
        headers.append(_header(batch))
    assert {h[0] for h in headers} == {_buffers.MAGIC}
    assert all(h[3] >= 0 for h in headers[10:]), "batches in fresh buffers: slots leaked"
    del reference


def _raise_in_mapped(worker_id):
    def broken(storage):
        raise OSError("no more file descriptors")
    _buffers.worker_buffers().mapped = broken


def test_an_error_laying_a_batch_out_is_raised_not_a_hang(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=1,
                                   worker_init_fn=_raise_in_mapped, timeout=60)
    with pytest.raises(OSError, match="no more file descriptors"):
        next(iter(loader))


class _Nested(torch.utils.data.IterableDataset):
    """Batches of a loader without workers, iterated inside another loader's worker."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        inner = torch_rlds.DataLoader(_dataset(self.path), batch_size=3)
        for batch in itertools.islice(inner, 2):
            yield {"kind": type(batch).__name__, "action": batch["action"]}


def test_a_loader_without_workers_inside_a_worker_hands_out_plain_batches(small_dataset):
    outer = torch_rlds.DataLoader(_Nested(small_dataset), batch_size=None, num_workers=1,
                                  collate_fn=lambda item: item)
    kinds = [item["kind"] for item in outer]
    assert kinds == ["dict", "dict"]


@pytest.mark.parametrize("order", ["window", "global"])
def test_the_loader_dataset_is_a_view_of_the_dataset_given(small_dataset, order):
    dataset = _dataset(small_dataset, repeat=False, order=order)
    loader = torch_rlds.DataLoader(dataset, batch_size=3)
    dataset.set_epoch(3)
    assert next(iter(loader))["meta"]["epoch"].tolist() == [3, 3, 3]
    state = dataset.state_dict()  # the loader moved the one cursor
    if order == "window":
        assert state["epoch"] == 3 and state["position"] > 0
    else:
        steps = state["fingerprint"]["num_steps"]
        assert (state["start"], state["done"], state["batch_size"]) == (3 * steps, 1, 3)
    again = torch_rlds.DataLoader(loader.dataset, batch_size=loader.batch_size)
    assert next(iter(again))["action"].shape == (3, 4, 7)
    with pytest.raises(ValueError, match=r"emits batches already \(batch_size=3, drop_last="
                                         r"False\).*got batch_size=4"):
        torch_rlds.DataLoader(loader.dataset, batch_size=4)
    plain = torch_rlds.DataLoader(dataset.batched(3), batch_size=None)
    assert next(iter(plain))["action"].shape == (3, 4, 7)


# -- each field a tensor of its own ---------------------------------------------------------
def _resident_pages(base: np.ndarray) -> int:
    """Pages of ``base``'s shared memory that hold memory (mincore: in the page cache)."""
    import ctypes

    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    pages = -(-base.nbytes // _fields.PAGE)
    vector = (ctypes.c_ubyte * pages)()
    assert mincore(base.ctypes.data, base.nbytes, vector) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vector)


@pytest.mark.skipif(not _fields._madvise(), reason="this system cannot give pages back")
@pytest.mark.parametrize("reuse", [True, False])
def test_a_kept_field_keeps_its_own_pages_not_its_batch(small_dataset, reuse):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=8, num_workers=1,
                                   reuse_buffers=reuse)
    kept, whole = [], None
    iterator = iter(loader)
    for i in range(11):
        batch = next(iterator)
        if i == 0:
            whole = batch  # kept whole: nothing of it is given back
        else:
            kept.append((batch["meta"]["episode_index"], batch["meta"]["episode_index"].clone()))
    del batch
    next(iterator)  # the loader settles what the caller let go of as it fetches the next
    whole_base = _buffer(whole["action"])
    assert _resident_pages(whole_base) == -(-whole_base.nbytes // _fields.PAGE)
    for i, (field, copy) in enumerate(kept):
        base = _buffer(field)
        assert base.nbytes > 30 * _fields.PAGE  # two cameras' frames
        # Its own page, and the one next to it at most (fields are 64 bytes apart).
        assert _resident_pages(base) <= 2, f"kept field {i}"
        assert torch.equal(field, copy), f"kept field {i} changed"
        saved = io.BytesIO()
        torch.save(field, saved)
        assert len(saved.getvalue()) < 2048  # the field, not its batch's buffer
    assert_batches_equal(_clone(whole), whole, "the batch kept whole")


def test_fields_sent_on_to_another_process_are_copied_and_free_the_slot(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=3, num_workers=1)
    iterator = iter(loader)
    batch = next(iterator)
    action = batch["action"]
    expected = action.clone()
    del batch
    (entry,) = [entry for table in _buffers._mapped.values() for entry in table.values()
                if entry[0] is _buffer(action)]
    action.share_memory_()  # what a torch.multiprocessing queue does to what it sends
    assert action.is_shared() and torch.equal(action, expected)
    next(iterator)
    assert entry[1] == 0  # the slot went back to its worker
