"""Bridges from torch_rlds to other frameworks, one module each, each importing its framework
itself: ``jax`` (global arrays, prefetch), ``orbax`` and ``torch`` (checkpoints), ``openpi``
(the openpi-style loader API) and ``check`` (the ``torch-rlds check`` command)."""
