"""The torch private API the math tier relies on (``lade_core.compat`` lists the rest: Ray's, MLflow's).

Written against torch 2.14. ``Tensor._version`` (the in-place edit counter) keys the losses' cast cache: no public
API says whether a buffer changed in place. ``torch._assert_async`` checks labels on an accelerator without the host
sync a Python ``if`` on a GPU tensor costs. If either changes, the losses' tests fail here first.
"""
from __future__ import annotations

import torch


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter (``Tensor._version``): bumped by every in-place op."""
    return t._version


def assert_async(condition: torch.Tensor, message: str) -> None:
    """A device-side assert (``torch._assert_async``): stops the step with ``message`` if ``condition`` is false,
    without the host sync a Python ``if`` on a GPU tensor costs."""
    torch._assert_async(condition, message)
