"""Which host this process is, for splitting each epoch between hosts."""

from __future__ import annotations

import sys


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)`` of this process.

    From jax when the caller has imported it and ``jax.distributed`` is initialised, else from
    ``torch.distributed`` when it is initialised, else ``(0, 1)``. jax is never imported here.
    """
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            from jax._src import distributed as jax_distributed

            if jax_distributed.global_state.client is not None:
                return int(jax.process_index()), int(jax.process_count())
        except (ImportError, AttributeError):
            pass
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1
