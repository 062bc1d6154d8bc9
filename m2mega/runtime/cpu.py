"""CPU runtime for megatron-core: maps its hard-coded CUDA calls to CPU.

megatron-core 0.16.1 assumes a GPU in places that have nothing to do with the maths: the pipeline
schedules allocate ``torch.zeros(..., device="cuda")``, p2p communication calls
``torch.cuda.synchronize()``, TP layers allocate on ``torch.cuda.current_device()`` and the RNG tracker
reads ``torch.cuda.default_generators``. On a machine without CUDA (our CI, laptops) this module patches
exactly those entry points so megatron's own TP layers, schedules and optimizer run on CPU under gloo.

It is the *only* place that does this. It is:
- explicit: nothing happens on import; :func:`activate` (called by :func:`m2mega.runtime.init`) patches,
- reversible: :func:`deactivate` restores every patched attribute (tests use it),
- refused on CUDA machines: :func:`activate` raises if ``torch.cuda.is_available()``.

``torch.cuda.is_available()`` itself is left returning False so code that checks it stays honest.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "deactivate", "is_active", "plain_dispatch"]

_lock = threading.Lock()
_saved: list[tuple[Any, str, Any]] = []
_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _to_cpu_device(dev: Any) -> Any:
    # An int device index means "cuda:<idx>" to torch factories; on CPU there is only one device.
    if _is_cuda_device(dev) or (isinstance(dev, int) and not isinstance(dev, bool)):
        return torch.device("cpu")
    return dev


def _backward_under_mode(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """``torch.autograd.backward`` with the device mapping active inside the autograd engine.

    torch pauses a mode while it handles a call, so a backward dispatched through the mode would run the
    whole engine without it, including python in the backward pass (megatron's activation recompute
    re-runs forwards that allocate ``device="cuda"``). Calling ``torch.autograd.backward`` again from here
    would re-dispatch to the mode forever, so this runs the same steps as its body (torch's own helpers)
    with a fresh mode pushed around the engine.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    if inputs is None:
        inputs = ()
    elif torch.is_tensor(inputs):
        inputs = (inputs,)
    else:
        inputs = tuple(inputs.values()) if isinstance(inputs, dict) else tuple(inputs)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
    if retain_graph is None:
        retain_graph = create_graph
    with _CudaToCpuMode():
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs, allow_unreachable=True,
                             accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments and ``Tensor.cuda()`` to CPU.

    Needed because megatron passes literal ``"cuda"`` strings (schedules, optimizer, grad buffers) that no
    attribute patch can reach. Only device arguments are touched; every other call passes through.
    """

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers and grad clipping assert param.type() == "torch.cuda.FloatTensor" (and
            # the Half/BFloat16 variants); report CPU tensors under the CUDA name they stand in for.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name[len("torch."):]
        if func is torch.Tensor.backward:
            if "gradient" in kwargs:
                kwargs["grad_tensors"] = kwargs.pop("gradient")
            return _backward_under_mode(args[0], *args[1:], **kwargs)
        if func is torch.autograd.backward:
            kwargs.pop("grad_variables", None)
            return _backward_under_mode(*args, **kwargs)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # The CPU generator plays the role of the per-device CUDA generator.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch(obj: Any, name: str, value: Any) -> None:
    _saved.append((obj, name, getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


_MISSING = object()


def is_active() -> bool:
    return _mode is not None


def activate() -> None:
    """Patch megatron-core's CUDA entry points to CPU. Idempotent; refuses to run with CUDA present."""
    global _mode
    with _lock:
        if _mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "m2mega.runtime.cpu.activate() called on a machine with CUDA; the CPU runtime must never "
                "be active on a GPU machine. Use m2mega.runtime.init(backend='nccl')."
            )
        from megatron.core.tensor_parallel import random as mrandom

        cuda = torch.cuda
        _patch(cuda, "current_device", lambda: torch.device("cpu"))
        _patch(cuda, "device_count", lambda: 1)
        _patch(cuda, "set_device", lambda *a, **k: None)
        _patch(cuda, "synchronize", lambda *a, **k: None)
        _patch(cuda, "empty_cache", lambda *a, **k: None)
        _patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
        _patch(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
        # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
        _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
        _patch(cuda, "Stream", _NullStream)
        _patch(cuda, "Event", _NullEvent)
        _patch(cuda, "current_stream", lambda *a, **k: _NullStream())
        _patch(cuda, "default_stream", lambda *a, **k: _NullStream())
        _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
        _patch(cuda, "memory_allocated", lambda *a, **k: 0)
        _patch(cuda, "max_memory_allocated", lambda *a, **k: 0)
        _patch(cuda, "memory_reserved", lambda *a, **k: 0)
        _patch(mrandom, "_get_cuda_rng_state", _get_rng_state)
        _patch(mrandom, "_set_cuda_rng_state", _set_rng_state)
        _mode = _CudaToCpuMode()
        _mode.__enter__()


def deactivate() -> None:
    """Undo :func:`activate`: restore every patched attribute and leave the device-rewrite mode."""
    global _mode
    with _lock:
        if _mode is None:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        while _saved:
            obj, name, old = _saved.pop()
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def plain_dispatch(device: torch.device) -> contextlib.AbstractContextManager:
    """Torch-function dispatch off while this CPU runtime is active, for hot loops that pass no device
    argument (the rollout engine's decode steps and sampling): the runtime's ``TorchFunctionMode`` that
    rewrites ``device="cuda"`` arguments costs microseconds on every torch call, a large share of a small
    model's decode step. Code that builds megatron modules or passes devices must keep it on."""
    if device.type == "cpu" and is_active():
        return torch._C.DisableTorchFunction()
    return contextlib.nullcontext()
