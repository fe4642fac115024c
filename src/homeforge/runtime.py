"""Process-wide torch settings, changed only for the duration of a block and then put back.

Library code calls these instead of ``torch.set_num_threads`` / ``torch.manual_seed``, so a
notebook or a test that calls homeforge finds its own settings (threads, random state) as it
left them. Only the CLI may change process state for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None``: leave as is)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """torch's global random state seeded with ``seed`` inside the block, restored after it
    (``None``: no seeding, nothing saved). CPU state only; CUDA generators are seeded too."""
    import torch

    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Python's, numpy's and torch's global random states saved on entry and restored on exit, so
    code that must seed them globally (a training loop: dropout, data order) leaves no trace."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
