"""Paths to datasets, states and statistics: local, or on an object store through an extra.

``etils.epath`` reads ``gs://`` and ``s3://`` through fsspec (gcsfs, s3fs), without TensorFlow.
Those filesystems are optional installs; :func:`to_path` names the torch_rlds extra that
brings the one a path needs before anything tries to open it.
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

# scheme -> (the module fsspec needs for it, the extra of torch-rlds that installs it)
REMOTE_SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


def scheme(path: str | os.PathLike) -> str | None:
    """The ``gs`` of ``gs://bucket/x``; ``None`` for a local path."""
    text = os.fspath(path)
    name, sep, _ = text.partition("://")
    return name if sep and name.isidentifier() else None


def to_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; raises ``ImportError`` naming the extra to install when
    its scheme needs a filesystem package that is missing (``pip install 'torch-rlds[gcs]'``
    for ``gs://``). Schemes other than those of :data:`REMOTE_SCHEMES` are left to fsspec."""
    kind = scheme(path)
    if kind in REMOTE_SCHEMES:
        module, extra = REMOTE_SCHEMES[kind]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{os.fspath(path)}: {kind}:// paths need {module}, which is not "
                              f"installed: pip install 'torch-rlds[{extra}]'")
    return epath.Path(path)
