"""Memory savings that leave the math unchanged: fewer saved activations in Llama-style MLPs, and freed heap memory
handed back to the operating system.

**Lean MLPs.** A Llama MLP computes ``down(silu(gate(x)) * up(x))``. For the backward pass autograd keeps ``gate(x)``
(for silu's gradient), ``silu(gate(x))`` and ``up(x)`` (for the product's) and the product (for ``down``'s weight).
:class:`SiLUMul` keeps only ``gate(x)`` and ``up(x)`` and recomputes ``silu(gate(x))`` when the backward pass needs it:
one ``(tokens, intermediate)`` tensor less per layer for an element-wise op of extra compute (Liger Kernel's SwiGLU
does the same in Triton; this is plain PyTorch, so it runs on CPUs too). With SmolLM2-135M and a PPO micro-batch of
8 x 91 tokens that is 128 of the 932 MiB a forward pass saves. The backward pass evaluates autograd's own formulas
(``mul``'s, then ``silu_backward``) on the same tensors, so the gradients are the stock model's, bit for bit (tested).

**Releasing the heap.** On a CPU, tensors come from glibc's ``malloc``. Freed blocks stay in the process (and in its
resident memory) until the top of the heap is free, which it rarely is in training: after a PPO update's backward pass
up to 1.4 GiB of SmolLM2's activations sat freed but resident, and the next large allocations were new memory on top.
:func:`release_heap` (glibc's ``malloc_trim``) hands free pages back; PPO calls it where a phase has just freed a lot
and another is about to allocate (docs/benchmarks.md has the traces).

**Keeping the heap** is the opposite trade, and the ``crslight`` command's default (:func:`keep_heap`; the environment
variable ``CRSLIGHT_HEAP=release`` restores glibc's defaults and the releases above). By default glibc serves every
block above 128 KiB-32 MiB with its own ``mmap`` and hands it back on ``free``, so each forward pass maps its
activations afresh and the kernel zero-fills every page on first touch. On the 2-core VM this project runs on, a
SmolLM2 forward and backward pass of 4 x 200 tokens under bf16 autocast took 3.8-10 s with 270-610 thousand page faults
(2-12 s of them in the kernel) and 1.8-1.9 s with none once the heap kept its pages (``benchmarks/heap.py``,
docs/benchmarks.md). The price is resident memory: freed activations stay in the process for the next step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn
from torch.nn import functional as F

LLAMA_STYLE_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
"""transformers MLP classes whose ``forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""


class SiLUMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for the backward pass and recomputing ``silu(gate)`` there."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


def lean_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with :class:`SiLUMul` in its forward: ``Lean<Name>``, one per class, importable from this module (so
    that lean models pickle)."""
    name = f"Lean{cls.__name__}"
    lean = globals().get(name)
    if lean is None or lean.__bases__ != (cls,):
        lean = type(name, (cls,), {"forward": _lean_mlp_forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = lean
    return lean


def lean_mlps(model: nn.Module) -> int:
    """Makes every Llama-style MLP of ``model`` with a SiLU activation use :class:`SiLUMul`; returns how many.

    Changes the class of those instances (to :func:`lean_class`), not the transformers classes: other models in the
    process are untouched, a deep copy (PPO's reference policy) stays lean, saved weights and exported folders are
    unaffected. Any other model is left as it is.
    """
    count = 0
    for module in model.modules():
        if (type(module).__name__ in LLAMA_STYLE_MLPS
                and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            module.__class__ = lean_class(type(module))
            count += 1
    return count


@functools.cache
def _libc():
    """glibc, or ``None`` where the C library is not glibc (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


HEAP_ENV = "CRSLIGHT_HEAP"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
_heap_kept = False


def keep_heap() -> bool:
    """Makes glibc keep freed memory for reuse (module docstring): no ``mmap`` per large block, no trimming of the
    heap's top, 64 MiB of padding when it grows; :func:`release_heap` then does nothing. Returns whether it did
    (``False`` without glibc, or with ``CRSLIGHT_HEAP=release``)."""
    global _heap_kept
    import os

    libc = _libc()
    if libc is None or os.environ.get(HEAP_ENV, "keep") == "release":
        return False
    _heap_kept = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                      and libc.mallopt(_M_TOP_PAD, 64 << 20))
    return _heap_kept


def release_heap() -> bool:
    """Returns the heap's free pages to the operating system (glibc's ``malloc_trim(0)``); ``False`` where the C
    library has no such call (macOS, musl), or where :func:`keep_heap` keeps them, which is then a no-op."""
    libc = _libc()
    if libc is None or _heap_kept:
        return False
    libc.malloc_trim(0)
    return True
