"""crslight.models.memory: lean MLPs give the stock model's logits and gradients bit for bit with fewer saved
activations; release_heap hands freed memory back."""

import copy
import gc
import pickle
import weakref

import pytest
import torch

from crslight.models import memory, tiny_causal_lm
from crslight.models.memory import SiLUMul, lean_mlps, release_heap


def saved_activation_bytes(model, **inputs) -> tuple[torch.Tensor, int]:
    """Logits of a forward pass and the bytes of the non-parameter tensors it saves for the backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(**inputs).logits
    return logits, sum(storages.values())


def test_silu_mul_gradients_are_autograds():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUMul.apply, (gate, up))
    grad = torch.randn(3, 5, dtype=torch.float64)
    expected = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), grad)
    for got, want in zip(torch.autograd.grad(SiLUMul.apply(gate, up), (gate, up), grad), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lean_mlps_same_gradients_fewer_saved_tensors(tiny_tokenizer, autocast):
    stock = tiny_causal_lm(tiny_tokenizer, seed=0)
    lean = copy.deepcopy(stock)
    assert lean_mlps(lean) == stock.config.num_hidden_layers
    ids = torch.randint(0, len(tiny_tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    b, t, width = ids.shape[0], ids.shape[1], stock.config.intermediate_size
    results = []
    for model in (stock, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, saved = saved_activation_bytes(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits, saved, {name: p.grad for name, p in model.named_parameters()}))
    (stock_logits, stock_saved, stock_grads), (lean_logits, lean_saved, lean_grads) = results
    assert torch.equal(stock_logits, lean_logits)
    for name, grad in stock_grads.items():
        assert torch.equal(grad, lean_grads[name]), name
    # one (b, t, intermediate) tensor less per layer, silu(gate(x)), recomputed in the backward pass (bf16 in autocast)
    assert stock_saved - lean_saved == stock.config.num_hidden_layers * b * t * width * (2 if autocast else 4)


def test_lean_mlps_leaves_other_activations_alone(tiny_tokenizer):
    model = tiny_causal_lm(tiny_tokenizer, seed=0)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert lean_mlps(model) == 0
    assert lean_mlps(torch.nn.Linear(2, 2)) == 0


def test_lean_model_pickles_and_frees_without_the_garbage_collector(tiny_tokenizer):
    model = tiny_causal_lm(tiny_tokenizer, seed=0)
    lean_mlps(model)
    assert lean_mlps(model) == 0  # already lean: nothing to do
    again = pickle.loads(pickle.dumps(model))
    assert type(again.model.layers[0].mlp).__name__ == "LeanLlamaMLP"
    gc.disable()
    try:
        ref = weakref.ref(model.model.layers[0].mlp)
        del model
        assert ref() is None  # no reference cycle keeps a lean module (and its weights) alive
    finally:
        gc.enable()


def test_release_heap_trims_unless_the_heap_is_kept(monkeypatch):
    """release_heap is glibc's malloc_trim(0); with the heap kept, or without glibc, it does nothing and says so (how
    much memory a trim hands back: ``benchmarks/heap.py --trim``)."""
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory, "_libc", Libc)
    monkeypatch.setattr(memory, "_heap_kept", False)
    assert release_heap() and calls == [0]
    monkeypatch.setattr(memory, "_heap_kept", True)
    assert not release_heap() and calls == [0]
    monkeypatch.setattr(memory, "_heap_kept", False)
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert not release_heap() and calls == [0]


@pytest.mark.skipif(not release_heap(), reason="the C library has no malloc_trim (not glibc)")
def test_release_heap_leaves_live_blocks_intact():
    """The real malloc_trim over a heap full of holes (every other 1 MiB block freed) keeps the live blocks' data."""
    big = torch.empty(16 * 2**20, dtype=torch.uint8)
    del big  # an mmapped block freed: glibc raises its mmap threshold to 16 MiB, the 1 MiB blocks come from the heap
    blocks = [torch.full((2**18,), float(i)) for i in range(400)]
    del blocks[::2]
    assert release_heap()
    assert [float(b[0]) for b in blocks] == [float(i) for i in range(1, 400, 2)]
    assert all(bool((b == b[0]).all()) for b in blocks)


@pytest.mark.skipif(not release_heap(), reason="the C library has no malloc_trim (not glibc)")
@pytest.mark.parametrize("mode", ["keep", "release"])
def test_crslight_command_keeps_the_heap_unless_told_to_release_it(mode):
    """The crslight command keeps freed memory in the heap: a 64 MiB tensor is not an mmapped block of its own (which
    ``free`` would unmap, and the next one would fault in afresh), and the heap is not trimmed;
    ``CRSLIGHT_HEAP=release`` keeps glibc's defaults. In a fresh process each."""
    import os
    import subprocess
    import sys

    code = (
        "import ctypes, sys, torch\n"
        "from crslight.models import memory\n"
        "sys.argv = ['crslight', '--help']\n"
        "from crslight.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks '\n"
        "                                              'fordblks keepcost').split()]\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = Info\n"
        "big = torch.ones(2**24)\n"
        "print('RESULT', memory._heap_kept, memory.release_heap(), libc.mallinfo2().hblkhd >= 2**26)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CRSLIGHT_HEAP": mode}, check=True,
                         capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert line.split()[1:] == (["True", "False", "False"] if mode == "keep" else ["False", "True", "True"])
