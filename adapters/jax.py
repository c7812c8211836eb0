"""JAX global arrays from a torch_rlds loader: :class:`JaxLoader` and a device-put collator.

Each process loads its own part of the global batch (``loader.batch_size`` global, divided by
the process count); :func:`to_global` turns that local batch into global ``jax.Array`` s with
``jax.make_array_from_process_local_data``, so a jitted step sees the whole global batch.

**Worker processes and jax.** Forking a process in which jax has started its backend (threads,
locks held by them) can deadlock the child. :class:`torch_rlds.DataLoader` therefore starts its
workers with ``forkserver`` once jax's backend runs in this process, where the caller left
``multiprocessing_context`` unset, and :class:`JaxLoader` does the same for another loader it
wraps (a ``StatefulDataLoader``) whose workers would start with the platform's ``fork``
(workers already running are kept; a start method the caller chose stays). The fork server
preloads torch_rlds and TFDS, so each worker starts in well under a second rather than
importing them anew. As with ``spawn``, the dataset and ``collate_fn`` must pickle
(module-level functions, not lambdas) and a training script must guard its entry point with
``if __name__ == "__main__":`` (workers import it).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from torch_rlds.adapters._common import StatefulLoader, loader_processes
from torch_rlds.adapters._prefetch import StatefulPrefetcher
from torch_rlds.loader import DataLoader, default_start_method, to_numpy

__all__ = ["JaxLoader", "device_put_collator", "to_global"]


class _GlobalBatch:
    """Turns local numpy batches into global arrays for one sharding."""

    def __init__(self, sharding: Any) -> None:
        import jax

        self._jax = jax
        self.sharding = sharding
        self.num_processes = len({d.process_index for d in sharding.device_set})
        self.batch_shards = _batch_axis_shards(sharding)

    def __call__(self, tree: Any, where: str = "batch") -> Any:
        if isinstance(tree, dict):
            return {k: self(v, f"{where}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            if all(isinstance(v, (str, bytes)) for v in tree):
                return tree  # strings stay on the host
            return type(tree)(self(v, f"{where}[{i}]") for i, v in enumerate(tree))
        if isinstance(tree, torch.Tensor):
            tree = tree.detach().numpy()
        if not isinstance(tree, np.ndarray) or tree.dtype.kind not in "biuf" or tree.ndim == 0:
            return tree
        return self._leaf(tree, where)

    def _leaf(self, local: np.ndarray, where: str) -> Any:
        local_batch = local.shape[0]
        global_batch = local_batch * self.num_processes
        if global_batch % self.batch_shards:
            step = math.lcm(self.num_processes, self.batch_shards)
            raise ValueError(
                f"{where}: the global batch {global_batch} ({local_batch} per process x "
                f"{self.num_processes} process{'es' if self.num_processes > 1 else ''}) does not "
                f"split over the {self.batch_shards} devices of the sharding's batch axis; set "
                f"loader.batch_size to a multiple of {step}, or change the mesh"
            )
        global_shape = (global_batch, *local.shape[1:])
        try:
            return self._jax.make_array_from_process_local_data(self.sharding, local,
                                                                global_shape)
        except ValueError as e:
            raise ValueError(f"{where}: local batch {local.dtype}{local.shape} -> global "
                             f"{global_shape} over {self.sharding}: {e}") from e


def _batch_axis_shards(sharding: Any) -> int:
    """How many slices the sharding cuts the leading (batch) axis into."""
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is not None and mesh is not None:
        axes = spec[0] if len(spec) else None
        if axes is None:
            return 1
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(mesh.shape[a] for a in axes)
    # Other shardings: count the distinct batch slices of a shape that any device count divides.
    probe = (math.factorial(len(sharding.device_set)),)
    try:
        slices = sharding.devices_indices_map(probe).values()
    except Exception:  # a sharding of another rank: let jax report any mismatch
        return 1
    return len({(s[0].start, s[0].stop) for s in slices})


def to_global(batch: Any, sharding: Any) -> Any:
    """``batch`` (this process's numpy or torch batch) with every numeric array turned into a
    global ``jax.Array`` of ``sharding``; strings stay host-side (numpy or lists).

    The global batch is the local one times the number of processes the sharding spans; each
    process must pass the same structure and local shapes. Raises ``ValueError`` naming the leaf
    and the sizes when the global batch does not split over the sharding's batch axis.
    """
    return _GlobalBatch(sharding)(batch)


def device_put_collator(sharding: Any, collate_fn: Callable[[Sequence[Any]], Any] | None = None,
                        ) -> Callable[[Sequence[Any]], Any]:
    """A ``collate_fn`` that batches samples (:func:`torch_rlds.collate` by default) and puts
    the batch on devices as global arrays (:func:`to_global`).

    It runs jax, so use it with ``num_workers=0`` only (a worker process must not run jax); with
    workers, collate in the workers and wrap the loader in :class:`JaxLoader` instead.
    """
    from torch_rlds.collate import collate as default_collate

    collate = collate_fn or default_collate
    convert = _GlobalBatch(sharding)

    def collate_and_put(samples: Sequence[Any]) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("device_put_collator runs jax and cannot run in a DataLoader "
                               "worker process; use num_workers=0, or JaxLoader")
        return convert(to_numpy(collate(samples)))

    return collate_and_put


class JaxLoader(StatefulPrefetcher):
    """Global ``jax.Array`` batches from a torch_rlds :class:`~torch_rlds.DataLoader` (or any
    ``StatefulDataLoader`` of numpy or torch batches), device-put ``prefetch`` batches ahead in a
    background thread.

    Yields the loader's batch pytree with every numeric leaf a global array of ``sharding``
    (:func:`to_global`); strings (``language_instruction``) stay host-side lists.

    **State.** :meth:`state_dict` is the wrapped loader's state after the last batch the caller
    received, not after the batches prefetched ahead; it is the loader's own format (JSON-safe,
    loadable by the loader itself) and :meth:`load_state_dict` resumes from it exactly.
    ``iter()`` again continues the current pass. Not thread-safe: one thread iterates, saves and
    restores.

    **Processes.** The loader must read for this process's part of the data (build it with
    :meth:`from_config` or :meth:`torch_rlds.config.Config.make_loader`, which take the process
    from jax, else torch.distributed, else a single process, unless the config overrides them).
    When the sharding spans several processes, that count must be the loader's process count.

    Args:
      loader: the per-process loader.
      sharding: a ``jax.sharding.Sharding`` whose leading axis splits the global batch, e.g.
        ``NamedSharding(Mesh(jax.devices(), ("data",)), PartitionSpec("data"))``.
      prefetch: batches transferred ahead (0: transfer in the caller's thread).
      preprocess: applied to each local batch (numpy) in the prefetch thread before the device
        put, e.g. to rename or reshape leaves.
    """

    def __init__(self, loader: StatefulLoader, sharding: Any, prefetch: int = 2, *,
                 preprocess: Callable[[Any], Any] | None = None) -> None:
        self.sharding = sharding
        self.process_index, self.process_count = loader_processes(loader)
        convert = _GlobalBatch(sharding)
        if convert.num_processes > 1 and convert.num_processes != self.process_count:
            raise ValueError(
                f"the sharding spans devices of {convert.num_processes} processes, but the "
                f"loader reads as process {self.process_index} of {self.process_count}: build "
                f"the loader with process_count={convert.num_processes} (jax.process_count())"
            )
        _avoid_fork(loader)
        transform: Callable[[Any], Any] = convert
        if preprocess is not None:
            def transform(batch: Any) -> Any:
                return convert(preprocess(to_numpy(batch)))
        super().__init__(loader, transform, prefetch, name="JaxLoader")

    @classmethod
    def from_config(cls, config: Any, sharding: Any, prefetch: int = 2,
                    **loader_kwargs: Any) -> JaxLoader:
        """A JaxLoader over ``config.make_loader()`` for this process (local batch = global
        batch / process count; raises when it does not divide)."""
        index, count = config.processes()
        loader_kwargs.setdefault("as_numpy", True)
        return cls(config.make_loader(index, count, **loader_kwargs), sharding, prefetch)

    @property
    def batches_seen(self) -> int:
        """Batches handed to the caller since the start of the stream (restored with the
        state when the loader is a torch_rlds DataLoader)."""
        ours = self.state_dict().get("torch_rlds")
        if isinstance(ours, dict) and type(ours.get("batches_seen")) is int:
            return ours["batches_seen"]
        return self.batches_received


def _avoid_fork(loader: Any) -> None:
    """Make a loader that is not torch_rlds's start future workers with forkserver where it
    would fork by default (a torch_rlds DataLoader decides at each ``iter()`` itself)."""
    if (isinstance(loader, DataLoader) or not getattr(loader, "num_workers", 0)
            or getattr(loader, "multiprocessing_context", None) is not None):
        return
    method = multiprocessing.get_start_method(allow_none=True) or (
        multiprocessing.get_all_start_methods()[0])
    if method == "fork":
        # With a sharding jax's backend runs: this also has the fork server preload
        # torch_rlds and TFDS.
        loader.multiprocessing_context = default_start_method() or "forkserver"
