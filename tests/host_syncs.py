"""Count the host syncs a piece of PyTorch code would make on a GPU, on a CPU-only machine.

On a GPU the host waits for the device whenever it reads device data (`.item()`, `bool(t)`,
`.tolist()`, `.cpu()`, a data-dependent output size such as `nonzero` or a boolean-mask
index) and whenever it copies pageable host data to the device without `non_blocking`
(`torch.as_tensor(list, device=cuda)`, `.to(cuda)`, indexing a device tensor with a host
index tensor). On a CPU run every tensor is a host tensor, so the counter tracks which
tensors *would* live on the device ("resident" tensors): the caller seeds them (the model's
parameters and buffers), and they spread

- through every aten op (a `TorchDispatchMode`): an op's outputs are resident when one of
  its tensor inputs is, autograd's backward included, so gradients of resident parameters
  are resident; an op without tensor inputs inherits from the Python-level call it runs in
  (a composite such as `pad_sequence` allocates on its inputs' device);
- through Python-level calls (a `TorchFunctionMode`): a factory or `.to()` whose `device=`
  is the accelerator makes resident outputs. Aten factories always carry a device, explicit
  or not, so only the Python-level call can tell `torch.zeros(3)` from
  `torch.zeros(3, device=device)`.

The accelerator is the `device` the counter is given (the trainer's device); on a CPU run a
`torch.device` equal to it means the accelerator, while the string "cpu" means the host, as
library code writes `.to("cpu")` for a readback and `.to(self.device)` for an upload.

Each counted sync is attributed to the innermost stack frame outside torch and this file,
and `SyncReport` aggregates them per (location, kind).

What it cannot see: code that branches on `device.type == "cuda"` runs its CPU branch here
(count what that branch does), a literal `torch.device("cpu")` in library code is taken for
the accelerator, and syncs hidden inside single CUDA kernels (e.g. `histc` finding its range)
are not modelled. CPU-only checks that CUDA skips (`one_hot`'s class range) are not counted.

    python tests/host_syncs.py     # both tables for one R50 training step (fast and stock paths)
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from detr_train.training.trainer import Trainer

aten = torch.ops.aten
Tensor = torch.Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)

# Python-level reads whose aten ops (if any) do not show that they read: counted here.
_READBACKS = {Tensor.tolist: "tolist", Tensor.cpu: "cpu", Tensor.numpy: "numpy", Tensor.__array__: "__array__"}
# Python-level reads that reach aten as `_local_scalar_dense`: counted there, named here.
_SCALAR_READS = {Tensor.item: "item", Tensor.__bool__: "bool", Tensor.__float__: "float", Tensor.__int__: "int",
                 Tensor.__index__: "index"}
# Calls that build a tensor from their first argument on the target device: a blocking upload
# unless that argument already is a resident tensor.
_UPLOADS = {torch.tensor, torch.as_tensor, torch.asarray, Tensor.new_tensor}
# Aten ops whose output size or value depends on device data, whatever their call site.
_DATA_DEPENDENT = {
    aten.nonzero: "nonzero", aten.masked_select: "masked_select", aten._unique: "unique",
    aten._unique2: "unique", aten.unique_dim: "unique", aten.unique_consecutive: "unique",
    aten.unique_dim_consecutive: "unique", aten.equal: "equal", aten.allclose: "allclose",
    aten.bincount: "bincount",
}
_INDEX_PUTS = {aten.index_put, aten.index_put_, aten._index_put_impl_}
_MASK_DTYPES = (torch.bool, torch.uint8)
_NO_DEVICE = object()


@dataclass(frozen=True)
class SyncRow:
    location: str  # path:line, relative to the repository or to site-packages
    kind: str
    count: int


@dataclass(frozen=True)
class SyncReport:
    rows: tuple[SyncRow, ...]  # most frequent first

    @property
    def total(self) -> int:
        return sum(row.count for row in self.rows)

    def table(self, limit: int | None = None) -> str:
        return format_table(self, limit)


def format_table(report: SyncReport, limit: int | None = None) -> str:
    """The report as an aligned text table, `limit` rows at most, and its total."""
    rows = report.rows if limit is None else report.rows[:limit]
    width = max([len("location"), *(len(row.location) for row in rows)])
    kind_width = max([len("kind"), *(len(row.kind) for row in rows)])
    lines = [f"{'location':<{width}}  {'kind':<{kind_width}}  count"]
    lines += [f"{row.location:<{width}}  {row.kind:<{kind_width}}  {row.count:>5}" for row in rows]
    if len(rows) < len(report.rows):
        rest = report.rows[len(rows):]
        lines.append(f"... {len(rest)} more rows, {sum(row.count for row in rest)} syncs")
    lines.append(f"total: {report.total} host syncs")
    return "\n".join(lines)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _display(filename: str) -> str:
    path = os.path.abspath(filename)
    if path.startswith(str(REPO_ROOT) + os.sep):
        return os.path.relpath(path, REPO_ROOT)
    marker = os.sep + "site-packages" + os.sep
    return path.rsplit(marker, 1)[1] if marker in path else path


def _caller_location() -> str:
    """The innermost frame outside torch and this file: the code that asked for the sync."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            return f"{_display(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


class _FunctionMode(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.counter._on_function(func, args, kwargs or {})


class _DispatchMode(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.counter._on_aten(func, args, kwargs or {})


class HostSyncCounter:
    """Counts the host syncs of the code run inside `counting()`; see the module docstring.

    Seed it with the tensors that would live on `device` (`mark_resident`) before counting.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._resident = WeakIdKeyDictionary()  # keyed by identity: a WeakSet would compare tensors with ==
        self._syncs: Counter[tuple[str, str]] = Counter()
        self._context: list[bool] = []  # per Python-level call in progress: does it compute on the device?
        self._labels: list[str | None] = []  # the Python-level name of a scalar read in progress
        self._quiet = 0  # > 0 while a Python-level call already counted is running its aten ops

    # --- public

    def mark_resident(self, *tensors: Tensor | Iterable[Tensor]) -> None:
        for item in tensors:
            for tensor in [item] if isinstance(item, Tensor) else item:
                self._resident[tensor] = True

    def is_resident(self, tensor: Any) -> bool:
        return isinstance(tensor, Tensor) and tensor in self._resident

    @contextmanager
    def counting(self) -> Iterator[HostSyncCounter]:
        with _FunctionMode(self), _DispatchMode(self):
            yield self

    def report(self) -> SyncReport:
        rows = sorted((SyncRow(location, kind, count) for (location, kind), count in self._syncs.items()),
                      key=lambda row: (-row.count, row.location, row.kind))
        return SyncReport(tuple(rows))

    # --- bookkeeping

    def _record(self, kind: str, count: int = 1) -> None:
        self._syncs[(_caller_location(), kind)] += count

    def _set_resident(self, outputs: Any, resident: bool) -> None:
        for tensor in _tensors(outputs):
            if resident:
                self._resident[tensor] = True
            else:
                self._resident.pop(tensor, None)

    @contextmanager
    def _silenced(self) -> Iterator[None]:
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _copy_of(self, result: Any, source: Tensor) -> Any:
        # On the CPU `.to(device)`, `.cpu()` and `as_tensor` return their input itself; on a GPU
        # they return a copy on the other side. A copy keeps the two sides' provenance apart.
        if result is not source:
            return result
        with self._silenced():
            return source.clone()

    # --- devices

    def _names_accelerator(self, raw: Any) -> bool:
        """Whether a device argument (device, string, index or tensor) means the accelerator."""
        if isinstance(raw, Tensor):
            return self.is_resident(raw)
        if isinstance(raw, str) and self.device.type == "cpu":
            return False  # on a CPU run "cpu" spells the host; the trainer passes a torch.device
        return torch.device(raw) == self.device

    def _explicit_device(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        # device=None is no choice: the default device for a factory, the input's for *_like and .to.
        raw = kwargs.get("device")
        if raw is None and func is torch.as_tensor and len(args) > 2:
            raw = args[2]
        return _NO_DEVICE if raw is None else raw

    # --- the Python-level calls

    def _on_function(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if func in _READBACKS and self.is_resident(args[0]):
            return self._readback(func, args, kwargs, _READBACKS[func])
        if func is Tensor.to:
            return self._to(args, kwargs)
        if func is torch.nn.functional.one_hot and self.is_resident(args[0]):
            return self._one_hot(args, kwargs)
        explicit = self._explicit_device(func, args, kwargs)
        if func in _UPLOADS:
            return self._upload(func, args, kwargs, explicit)
        if explicit is _NO_DEVICE:
            return self._call(func, args, kwargs, any(self.is_resident(t) for t in _tensors((args, kwargs))))
        on_device = self._names_accelerator(explicit)
        result = self._call(func, args, kwargs, on_device)
        self._set_resident(result, on_device)
        return result

    def _call(self, func: Callable, args: tuple, kwargs: dict, on_device: bool) -> Any:
        self._context.append(on_device)
        self._labels.append(_SCALAR_READS.get(func))
        try:
            return func(*args, **kwargs)
        finally:
            self._context.pop()
            self._labels.pop()

    def _readback(self, func: Callable, args: tuple, kwargs: dict, kind: str) -> Any:
        self._record(kind)
        with self._silenced():
            result = func(*args, **kwargs)
        if isinstance(result, Tensor):
            result = self._copy_of(result, args[0])
            self._set_resident(result, False)
        return result

    def _upload(self, func: Callable, args: tuple, kwargs: dict, explicit: Any) -> Any:
        data = args[1] if func is Tensor.new_tensor else args[0]
        from_device = self.is_resident(data)
        if explicit is not _NO_DEVICE:
            to_device = self._names_accelerator(explicit)
        else:
            to_device = self.is_resident(args[0]) if func is Tensor.new_tensor else from_device
        # Device values inside a list are each read to the host before the tensor is built.
        reads = sum(self.is_resident(t) for t in _tensors(data) if t is not data)
        if reads:
            self._record(f"{func.__name__}(device values) D2H", reads)
        result = self._call(func, args, kwargs, to_device)
        if to_device != from_device:
            self._record(f"{func.__name__}(host data) H2D" if to_device else f"{func.__name__}(device data) D2H")
            if isinstance(data, Tensor):
                result = self._copy_of(result, data)
        self._set_resident(result, to_device)
        return result

    def _one_hot(self, args: tuple, kwargs: dict) -> Any:
        # On the CPU one_hot checks the class range with two reads; CUDA leaves that to the
        # device asserts of its scatter, and reads the data only to find a missing num_classes.
        num_classes = kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
        if num_classes < 0:
            self._record("one_hot without num_classes")
        with self._silenced():
            result = torch.nn.functional.one_hot(*args, **kwargs)
        self._set_resident(result, True)
        return result

    def _to(self, args: tuple, kwargs: dict) -> Any:
        source = args[0]
        target = kwargs.get("device")
        if target is None and len(args) > 1 and not isinstance(args[1], torch.dtype):
            target = args[1]
        target = _NO_DEVICE if target is None else target
        # In every overload of Tensor.to the first positional bool is non_blocking.
        non_blocking = kwargs.get("non_blocking", next((a for a in args[1:] if isinstance(a, bool)), False))
        result = self._call(Tensor.to, args, kwargs, self.is_resident(source))
        if target is _NO_DEVICE or self._names_accelerator(target) == self.is_resident(source):
            return result  # a dtype change, or the same side: the aten ops carry the provenance
        to_device = self._names_accelerator(target)
        if not non_blocking:
            self._record(".to(device) H2D" if to_device else ".to(host) D2H")
        result = self._copy_of(result, source)
        self._set_resident(result, to_device)
        return result

    # --- the aten ops

    def _on_aten(self, func, args: tuple, kwargs: dict) -> Any:
        if self._quiet:
            return func(*args, **kwargs)
        inputs = list(_tensors((args, kwargs)))
        kind = self._sync_kind(func, args, kwargs)
        if kind is not None:
            self._record(kind)
        result = func(*args, **kwargs)
        if func.overloadpacket is aten.copy_:
            return result  # the destination keeps its side: a copy to the host stays on the host
        if inputs:
            if any(self.is_resident(t) for t in inputs):
                self._set_resident(result, True)
        elif self._context and self._context[-1]:
            self._set_resident(result, True)
        return result

    def _sync_kind(self, func, args: tuple, kwargs: dict) -> str | None:
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            if not self.is_resident(args[0]):
                return None
            return (self._labels[-1] if self._labels else None) or "item"
        if packet in _DATA_DEPENDENT:
            return _DATA_DEPENDENT[packet] if any(self.is_resident(t) for t in _tensors(args)) else None
        if func is aten.repeat_interleave.Tensor:  # the overload the others decompose into
            return "repeat_interleave" if self.is_resident(args[0]) and kwargs.get("output_size") is None else None
        if packet is aten.index:
            return self._index_kind(args[0], args[1])
        if packet in _INDEX_PUTS:
            return self._index_put_kind(args[0], args[1], args[2], args[3] if len(args) > 3 else False)
        if packet is aten.copy_:
            return self._copy_kind(args[0], args[1], kwargs.get("non_blocking", len(args) > 2 and args[2]))
        return None

    def _index_kind(self, source: Tensor, indices: list) -> str | None:
        indices = [index for index in indices if index is not None]
        resident = self.is_resident(source)
        if any(index.dtype in _MASK_DTYPES and (resident or self.is_resident(index)) for index in indices):
            return "bool-mask index"  # the mask becomes indices through nonzero
        if resident and any(not self.is_resident(index) and index.dim() >= 1 for index in indices):
            return "host index H2D"
        if not resident and any(self.is_resident(index) for index in indices):
            return "device index of a host tensor D2H"
        return None

    def _index_put_kind(self, target: Tensor, indices: list, values: Tensor, accumulate: bool) -> str | None:
        defined = [index for index in indices if index is not None]
        # x[mask] = host scalar: index_put_ runs masked_fill_, with no sync (canDispatchToMaskedFill).
        masked_fill = (not accumulate and values.numel() == 1 and not self.is_resident(values) and len(defined) == 1
                       and defined[0].dtype in _MASK_DTYPES
                       and self.is_resident(defined[0]) == self.is_resident(target))
        return None if masked_fill else self._index_kind(target, indices)

    def _copy_kind(self, destination: Tensor, source: Tensor, non_blocking: bool) -> str | None:
        if non_blocking or self.is_resident(destination) == self.is_resident(source):
            return None
        return "copy_ H2D" if self.is_resident(destination) else "copy_ D2H"


def count_host_syncs(fn: Callable[[], Any], device: torch.device | str,
                     resident: Iterable[Tensor] = ()) -> tuple[Any, SyncReport]:
    """Run `fn()` with `resident` tensors on the (would-be) device; its result and the syncs."""
    counter = HostSyncCounter(device)
    counter.mark_resident(resident)
    with counter.counting():
        result = fn()
    return result, counter.report()


# --- one training step of the R50 Deformable DETR -------------------------------------------

# The R50 architecture at its real size, on images small enough that a CPU step takes seconds.
R50_OVERRIDES = [
    "model=deformable_detr",
    "data.generate.num_train=4",
    "data.generate.num_val=2",
    "data.generate.image_size=128",
    "data.image_size=128",
    "data.eval_size=128",
    "data.num_workers=0",
    "training.batch_size=2",
    "training.progress=false",
    "training.log_every=0",
]


def build_r50_trainer(root: Path) -> Trainer:
    """A Trainer of the R50 config (random init, nothing downloaded), data generated under `root`."""
    # Imported here: the counter itself must stay cheap to import.
    from hydra import compose, initialize_config_dir

    from detr_train.checkpointing.plan import Plan
    from detr_train.config import config_dir
    from detr_train.training.trainer import trainer_for

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"data.root={root / 'data'}", *R50_OVERRIDES])
    # A new run with no callbacks: one step is all that is counted.
    return trainer_for(Plan(cfg, root / "run"))


def undo_fast_paths(model: torch.nn.Module) -> None:
    """Back to transformers' own loss and encoder layers, as a model has them before `apply_fast_paths`."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrEncoderLayer

    from detr_train.modeling.sync_free import SyncFreeDeformableDetrEncoderLayer

    model.loss_function = LOSS_MAPPING[model.loss_type]
    for module in model.modules():
        if type(module) is SyncFreeDeformableDetrEncoderLayer:
            module.__class__ = DeformableDetrEncoderLayer


def training_step_syncs(trainer: Trainer) -> SyncReport:
    """The syncs of one `trainer.step` on the first batch of epoch 1, counted from a fresh optimiser.

    The batch arrives on the host, as from the loader; the step's own copies move it.
    """
    trainer.train_sampler.set_epoch(1)
    batch = next(iter(trainer.train_loader))
    # Lazily created again inside the count, so that its tensors get their provenance there
    # (moments beside their parameter on the device, AdamW's step counter on the host).
    trainer.optimizer.state.clear()
    model = trainer.model
    _, report = count_host_syncs(lambda: trainer.step([batch], trainer.state), trainer.device,
                                 [*model.parameters(), *model.buffers()])
    return report


def fast_and_stock_syncs(root: Path) -> tuple[SyncReport, SyncReport]:
    """One R50 step with the Trainer's fast paths, then one with transformers' loss and encoder layers."""
    trainer = build_r50_trainer(root)
    fast = training_step_syncs(trainer)
    undo_fast_paths(trainer.model)
    stock = training_step_syncs(trainer)
    return fast, stock


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fast, stock = fast_and_stock_syncs(Path(tmp))
    print("Fast paths (as the Trainer applies them):")
    print(fast.table())
    print("\nStock transformers loss and encoder layers:")
    print(stock.table())


if __name__ == "__main__":
    main()
