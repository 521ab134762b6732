"""Running torch on one thread for a moment: what a computation needs whose bits must not depend on the thread count.

Matrix products (MKL), float64 convolutions and the scalar tails of elementwise kernels sum or round in
an order that follows how torch splits the work among its threads (measured: a 1×64 by 64×256 product
on three threads, softplus, a 5×5 float64 convolution). Where such a result feeds a decoder that must
give the same pixels everywhere (entropy tables, taef2's pool statistics), it runs on one thread; the
parts that do are small, so the thread count costs nothing measurable there.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op thread count set to 1 inside, restored after. Not for code that other threads run
    torch in at the same time (they would see one thread too)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
