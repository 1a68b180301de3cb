"""Data parallelism over the processes of a launcher (``torchrun``, ``accelerate launch``): which
process this is, which share of the work is its own, summing gradients over processes,
gathering results in input order, and stopping every process cleanly when one fails.

Without a launcher (or with one process) nothing here communicates: :func:`world` is one
process of rank 0, every item is this process's own, and the stages run exactly as they
always have. The CLI calls :func:`enable` for the commands that split their work (localize,
measure, neighbors, relearn); a library user under a launcher calls it too. Until then the
library never communicates, so a call that one process makes alone cannot hang.

Every process reads the same inputs and holds its own copy of the model (on ``cuda:LOCAL_RANK``
on a GPU machine). The work is split, never the decisions: every process computes the same
summed gradients and the same gathered statistics, so every one takes the same optimiser step
and reaches the same early-stop and pruning verdicts.

Failures: every collective here begins with a check-in of one number ("has any process
failed?"). A process that fails calls :func:`report_failure`, which joins the check-in the
others are waiting in; then every process learns who failed and why, the lowest failed rank
reports the error (the CLI prints it as its one ``Error:`` line) and the others stop quietly
(:class:`PeerFailed`) with the same exit status. The CLI ends every split command with
:func:`finish`, a last check-in, so a failure after the last collective (rank 0 writing the
output) reaches the others too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Sequence

# importing this module must not import torch: the CLI imports it to decide, before any stage
# loads, which process runs what
from . import NeumuterError

if TYPE_CHECKING:
    import torch

#: seconds a process waits in a collective for the others (a slow model load, rank 0 writing a
#: large checkpoint); NEUMUTER_DIST_TIMEOUT overrides it
DEFAULT_TIMEOUT = 3600
#: elements summed by one all-reduce call (bounds the extra memory of a flattened bucket)
BUCKET_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class World:
    """This process's place among the launcher's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


class PeerFailed(Exception):
    """Another process failed (and reported it): this one stops quietly with ``exit_code``."""

    def __init__(self, rank: int, message: str, exit_code: int):
        self.rank, self.message, self.exit_code = rank, message, exit_code
        super().__init__(f"rank {rank} failed: {message}")


_world = World()
_enabled = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise NeumuterError(f"{name}={value!r} is not a whole number (it is set by the launcher)") from None


def launched() -> World:
    """The world the launcher's environment describes (WORLD_SIZE, RANK, LOCAL_RANK, as
    torchrun and accelerate launch set them); one process of rank 0 without a launcher."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise NeumuterError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the launcher")
    return World(rank, size, local_rank)


def enable() -> World:
    """Split the work of the following stage calls over the launcher's processes. The process
    group is made at the first collective (gloo for CPU tensors, NCCL for CUDA ones)."""
    global _world, _enabled
    _world = launched()
    _enabled = _world.size > 1
    if _enabled and not _world.main:
        # rank 0 shows the libraries' loading bars and warnings; read when they are imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return _world


def world() -> World:
    """The world the stages split their work over (one process until :func:`enable`)."""
    return _world


def is_main() -> bool:
    """Whether this process writes outputs and progress (rank 0; the only one without a launcher)."""
    return _world.main


def place(device: str) -> str:
    """The device of this process for a resolved ``device``: ``cuda:LOCAL_RANK`` when several
    processes share a GPU machine, so that each one computes on its own GPU."""
    import torch

    if _enabled and device == "cuda":
        if _world.local_rank >= torch.cuda.device_count():
            raise NeumuterError(f"process {_world.rank} (local rank {_world.local_rank}) has no GPU of its own: "
                                f"{torch.cuda.device_count()} GPUs for more processes on this machine")
        torch.cuda.set_device(_world.local_rank)
        return f"cuda:{_world.local_rank}"
    return device


# ---------------------------------------------------------------- who does what

def owns(index: int) -> bool:
    """Whether item ``index`` (a record, a batch) of a list dealt round-robin is this process's."""
    return index % _world.size == _world.rank


def split(items: Sequence) -> Sequence:
    """This process's contiguous share of ``items`` (sizes differ by at most one, the lower
    ranks taking the larger shares); all of them in one process."""
    if _world.size == 1:
        return items
    base, extra = divmod(len(items), _world.size)
    start = _world.rank * base + min(_world.rank, extra)
    return items[start:start + base + (_world.rank < extra)]


# ---------------------------------------------------------------- collectives

def _ensure_group() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    seconds = _env_int("NEUMUTER_DIST_TIMEOUT", DEFAULT_TIMEOUT)
    try:
        dist.init_process_group(backend, rank=_world.rank, world_size=_world.size,
                                timeout=timedelta(seconds=seconds))
    except (ValueError, RuntimeError) as exc:
        raise NeumuterError(f"cannot reach the other processes of the launcher: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _guarded(function, *args):
    """A torch.distributed call; a broken connection or a timeout becomes one clear error."""
    try:
        return function(*args)
    except RuntimeError as exc:     # gloo and NCCL errors (DistBackendError is one)
        raise NeumuterError(f"lost contact with the other processes: {_first_line(exc)}") from None


def _check_in(failure: tuple[str, int] | None) -> list | None:
    """The check-in that begins every collective: None when no process failed, else every
    process's ``(message, exit_code)`` or None, in rank order."""
    import torch
    import torch.distributed as dist

    _ensure_group()
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
    _guarded(dist.all_reduce, flag)
    if not int(flag):
        return None
    reports: list = [None] * _world.size
    _guarded(dist.all_gather_object, reports, failure)
    return reports


def _first_failure(reports: list) -> tuple[int, str, int]:
    rank = min(r for r, report in enumerate(reports) if report is not None)
    message, exit_code = reports[rank]
    return rank, message, exit_code


def _before_collective() -> None:
    reports = _check_in(None)
    if reports is not None:
        raise PeerFailed(*_first_failure(reports))


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (nothing in one process). Tensors are
    flattened into buckets per device and dtype, so a model's gradients take a few calls; CUDA
    buckets go through NCCL, the others through gloo on the CPU."""
    if not _enabled:
        return
    import torch
    import torch.distributed as dist

    _before_collective()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in [*group, None]:
            if bucket and (tensor is None or size + tensor.numel() > BUCKET_ELEMENTS):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                if flat.device.type not in ("cpu", "cuda"):      # e.g. MPS: gloo sums on the CPU
                    flat = flat.cpu()
                _guarded(dist.all_reduce, flat)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.device))
                    offset += t.numel()
                bucket, size = [], 0
            if tensor is not None:
                bucket.append(tensor)
                size += tensor.numel()


def all_gather(local: Any) -> list:
    """Every process's ``local`` (any picklable object), in rank order; ``[local]`` in one process."""
    if not _enabled:
        return [local]
    import torch.distributed as dist

    _before_collective()
    out: list = [None] * _world.size
    _guarded(dist.all_gather_object, out, local)
    return out


def gather_items(local: dict[int, Any], count: int) -> list:
    """The list of ``count`` items of which each process computed some (``local``: index ->
    item), assembled in input order on every process."""
    if not _enabled:
        return [local[i] for i in range(count)]
    merged: dict[int, Any] = {}
    for part in all_gather(local):
        merged.update(part)
    missing = [i for i in range(count) if i not in merged]
    if missing:
        raise NeumuterError(f"internal error: no process computed item {missing[0]} of {count}")
    return [merged[i] for i in range(count)]


# ---------------------------------------------------------------- ending

def report_failure(message: str, exit_code: int) -> str:
    """Tell the other processes that this one failed. Returns the message to show (prefixed
    with the rank when some processes did not fail), or raises :class:`PeerFailed` when a
    lower rank failed too and reports it instead. In one process: ``message`` as it is."""
    if not _enabled:
        return message
    try:
        reports = _check_in((message, exit_code))
    except NeumuterError:
        return f"rank {_world.rank}: {message}"       # the others are gone: say it here
    first = _first_failure(reports)
    if first[0] != _world.rank:
        raise PeerFailed(*first)
    everyone = all(report is not None for report in reports)
    return message if everyone else f"rank {_world.rank}: {message}"


def finish() -> None:
    """The last check-in of a split command: raises :class:`PeerFailed` if another process
    failed after the last collective; then the process group is closed."""
    if not _enabled:
        return
    try:
        _before_collective()
    finally:
        close()


def close() -> None:
    """Close the process group, if one was made; safe to call more than once. Every way out of
    a split command ends here: a process that exits with its group still open can abort in
    gloo's threads (``terminate called without an active exception``) once a peer has gone."""
    global _enabled
    _enabled = False
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["World", "PeerFailed", "launched", "enable", "world", "is_main", "place", "owns", "split",
           "all_reduce_sum", "all_gather", "gather_items", "report_failure", "finish", "close"]
