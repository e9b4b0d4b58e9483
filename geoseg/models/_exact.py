"""Elementwise transcendental ops that give the same bits for a pixel wherever it sits in the tensor.

PyTorch's CPU elementwise kernels run full SIMD vectors (SLEEF ``exp``, ``log1p``, ``tanh`` ...) and finish
each thread's chunk with a scalar loop using libm, which rounds differently in the last bit. Chunk
boundaries follow the tensor's size and the thread count, so the same pixel can take the vector path in a
tile and the scalar path in the whole image: tiled inference would differ by ~1e-6. ``simd_inplace``
applies an in-place op to a prefix whose per-thread chunks are whole multiples of the SIMD loop step (so
no scalar tail) and to the short remainder in a zero-padded buffer: every element takes the vector path.

Relies on TensorIterator's splitting (``at::internal::GRAIN_SIZE`` elements per thread at least, chunks of
``ceil(n / threads)``); tests/test_dynamic_world.py checks the result stays exact on awkward sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["simd_inplace"]

_GRAIN = 32768  # at::internal::GRAIN_SIZE: below this TensorIterator runs a single serial loop
_ALIGN = 64  # elements: a multiple of every vectorised loop step (2 vectors of 16 floats with AVX-512)


def _aligned_prefix(n: int) -> int:
    """Largest length <= n whose per-thread chunks are all whole multiples of _ALIGN."""
    threads = torch.get_num_threads()
    length = n
    while True:
        t = 1 if threads == 1 or length <= _GRAIN else min(threads, -(-length // _GRAIN))
        aligned = length // (_ALIGN * t) * (_ALIGN * t)
        if aligned == length:
            return length
        length = aligned


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of x's memory (contiguous or channels_last)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(-1)
    raise ValueError("simd_inplace needs a contiguous or channels_last tensor")


def simd_inplace(op_: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """Apply the in-place elementwise ``op_`` to ``x`` with every element on the SIMD path; returns ``x``."""
    if x.device.type != "cpu":  # GPU kernels have no scalar tail
        op_(x)
        return x
    flat = _flat(x)
    n = flat.numel()
    m = _aligned_prefix(n)
    if m:
        op_(flat[:m])
    if m < n:
        tail = flat.new_zeros(-(-(n - m) // _ALIGN) * _ALIGN)  # < _ALIGN * threads elements: serial
        tail[: n - m] = flat[m:]
        op_(tail)
        flat[m:] = tail[: n - m]
    return x
