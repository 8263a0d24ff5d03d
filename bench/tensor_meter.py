"""Peak bytes of live CPU tensors: what `torch.cuda.max_memory_allocated` measures on a GPU, for a CPU run.

The CPU allocator keeps no statistics, and a process's RSS mixes tensors with Python, libraries and freed pages
the allocator has not returned. This meter counts tensor storages themselves: every storage alive when it starts
(found through the garbage collector: model weights, quantisation state) plus every storage an operator returns
while it runs (a TorchDispatchMode sees forward, backward and optimizer ops alike), each counted once, and
subtracted when the storage is freed. Views share their base's storage and cost nothing, as on the GPU.

Not counted: what bypasses the dispatcher (tensors made from Python buffers, e.g. safetensors loading; none happen
inside a training step) and the caching allocator's rounding and fragmentation, which exist on a GPU only.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorMeter(TorchDispatchMode):
    """`with LiveTensorMeter() as meter: trainer.train()`, then `meter.peak` / `meter.start` (bytes)."""

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = self.start = self.peak = 0

    def _count(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
            return
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __enter__(self):
        with warnings.catch_warnings():  # isinstance() on every object trips deprecated modules' warnings
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self._count(obj)
        self.start = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            self._count(value)
        return out
