"""Run-time shims that let the TIRG code (github.com/google/tirg, 2019) run unchanged on this machine's Python 3,
numpy 2 and torch 2 CPU, for benchmarks/official_tirg.py.

None of its code is copied or edited. Each shim changes what one name means, and only these:
- `.cuda()` on tensors and modules returns the object itself, while `tirg_runtime()` is active: the code calls it
  unconditionally, and the comparison is on the CPU.
- `torchvision.models.resnet18(pretrained=True)` in img_text_composition_models.py builds a randomly initialised
  ResNet-18: the compared recipe starts from random init (no ImageNet weights are available offline), as cirlab's
  row does with model.image_weights=random.
- `np.load` in datasets.py allows pickles: the CSS file is a pickled dict, which numpy >= 1.16.3 refuses by default.
- `range` in img_text_composition_models.py returns a list, as in Python 2: its soft triplet loss adds two ranges.
- Old-style autograd Functions (forward and backward as methods of an instance, which torch no longer runs; the
  triplet loss is one) run through a modern Function that calls those same two methods.
- tensorboardX, which main.py imports for its SummaryWriter, is a stand-in module when it is not installed:
  official_tirg.py passes its own logger, so no writer is ever built.
- main.py sets torch to 3 threads when imported; the count is put back to what it was, the one cirlab runs with.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
import torchvision

MODULES = ("torch_functions", "text_model", "img_text_composition_models", "datasets", "test_retrieval", "main")


@dataclass(frozen=True)
class TirgCode:
    """The TIRG code's entry points (its training loop and its evaluation), imported with the shims in place."""
    main: types.ModuleType
    test_retrieval: types.ModuleType


class Overlay:
    """A module seen through a few replaced attributes; every other attribute is the module's own."""

    def __init__(self, module: types.ModuleType, **replaced: Any) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def python2_range(*args: int) -> list[int]:
    return list(range(*args))


def random_init_resnet18(pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """ResNet-18 from random init, whatever `pretrained` asks for (see the module's docstring)."""
    return torchvision.models.resnet18(weights=None, **kwargs)


class LegacyState(types.SimpleNamespace):
    """Stands in for an old-style Function instance during one call: its attributes, and the save_for_backward /
    saved_tensors pair that modern torch only wires up on a ctx."""

    def __init__(self, legacy: torch.autograd.Function) -> None:
        super().__init__(**vars(legacy))

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


class LegacyFunctionCall(torch.autograd.Function):
    """Applies an old-style Function instance: its own forward and backward methods, on a LegacyState. Inputs are
    detached, as the old API handed its methods plain tensors (the TIRG loss calls .numpy() on them)."""

    @staticmethod
    def forward(ctx: Any, legacy: torch.autograd.Function, *inputs: torch.Tensor) -> Any:
        ctx.state = LegacyState(legacy)
        ctx.legacy_backward = type(legacy).backward
        return type(legacy).forward(ctx.state, *(tensor.detach() for tensor in inputs))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        gradients = ctx.legacy_backward(ctx.state, *grad_outputs)
        return (None, *(gradients if isinstance(gradients, tuple) else (gradients,)))


def call_legacy(self: torch.autograd.Function, *inputs: torch.Tensor) -> Any:
    return LegacyFunctionCall.apply(self, *inputs)


def legacy_functions(module: types.ModuleType) -> list[type]:
    """The module's autograd Functions whose forward is an instance method (the pre-1.3 API)."""
    return [value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, torch.autograd.Function)
            and value is not torch.autograd.Function and value.__module__ == module.__name__
            and not isinstance(inspect.getattr_static(value, "forward"), staticmethod)]


def stand_in_tensorboardx() -> None:
    try:
        importlib.import_module("tensorboardX")
    except ImportError:
        stand_in = types.ModuleType("tensorboardX", "stand-in: the benchmark passes its own logger")

        def no_writer(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("tensorboardX is not installed; benchmarks/official_tirg.py passes its own logger")

        stand_in.SummaryWriter = no_writer  # type: ignore[attr-defined]
        sys.modules["tensorboardX"] = stand_in


def load_tirg_code(folder: Path) -> TirgCode:
    """Import the TIRG code from a checkout and put the shims in place (see the module's docstring)."""
    folder = Path(folder).resolve()
    missing = [f"{name}.py" for name in MODULES if not (folder / f"{name}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a checkout of github.com/google/tirg: it has no {', '.join(missing)}")
    for name in MODULES:  # the code imports its modules by bare name: another module of that name would shadow it
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != folder:
            raise RuntimeError(f"a module named {name!r} is already imported from {loaded.__file__}; "
                               "run the TIRG code in a fresh process")
    threads = torch.get_num_threads()
    stand_in_tensorboardx()
    sys.path.insert(0, str(folder))
    try:
        modules = {name: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(str(folder))
        torch.set_num_threads(threads)
    models = modules["img_text_composition_models"]
    models.range = python2_range
    models.torchvision = Overlay(torchvision, models=Overlay(torchvision.models, resnet18=random_init_resnet18))
    modules["datasets"].np = Overlay(numpy, load=functools.partial(numpy.load, allow_pickle=True))
    for function in legacy_functions(modules["torch_functions"]):
        function.__call__ = call_legacy
    return TirgCode(modules["main"], modules["test_retrieval"])


def _same_object(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self


@contextmanager
def tirg_runtime() -> Iterator[None]:
    """While active, `.cuda()` on tensors and modules keeps them where they are (on the CPU)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = _same_object  # type: ignore[method-assign]
    torch.nn.Module.cuda = _same_object  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved  # type: ignore[method-assign]
