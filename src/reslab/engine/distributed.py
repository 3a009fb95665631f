"""Training across processes with ``torchrun`` and DistributedDataParallel.

``reslab train --processes N`` starts N local processes itself (:func:`launch_local`), in the
same way. ``torchrun`` starts one process per worker and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...; see the torchrun docs); that is
the launcher's contract, so this module reads it and nothing else does. Gradients are averaged
by DDP over gloo on CPU and nccl on GPU. Every rank draws the same global batch (same seed, same
order) and keeps its own slice of it, so ``--batch-size`` stays the global batch and a run on N
processes follows the same sequence of updates as one process.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from reslab.errors import ReslabError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        if not self.active:
            return batch
        return batch.tensor_split(self.size)[self.rank]


def init_world() -> World:
    """Join the process group when started by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        # leave the group before the interpreter tears down: left to exit-time destructors,
        # gloo's threads sometimes aborted a rank that had finished its work ("terminate
        # called without an active exception"), and the launcher then reported a failure
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise ReslabError(
            f"--batch-size {batch_size} (the global batch) must divide evenly among "
            f"{world.size} processes; try {batch_size - batch_size % world.size or world.size}"
        )


def any_rank(world: World, *flags: bool) -> list[bool]:
    """Each flag, true on every rank when it is true on one: a signal may reach one process
    first, and a loss may overflow on one shard only; all ranks must stop at the same step."""
    if not world.active:
        return [bool(f) for f in flags]
    values = torch.tensor([int(f) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def sum_over_ranks(world: World, *values: torch.Tensor) -> list[torch.Tensor]:
    if not world.active:
        return list(values)
    packed = torch.stack([v.detach().double().reshape(()) for v in values])
    dist.all_reduce(packed)
    return list(packed.unbind())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose batch statistics are summed over all processes.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one all-reduces (count, sum, sum of
    squares) per channel with a differentiable all-reduce, so it
    works over gloo too, and gradients flow through the shared statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if dist.get_world_size() == 1:
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32)
        stats = torch.cat([count, xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3))])
        stats = _AllReduceSum.apply(stats)
        n, total, squares = stats[0], stats[1 : 1 + x.shape[1]], stats[1 + x.shape[1] :]
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        out = xf * scale[None, :, None, None] + shift[None, :, None, None]
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for :class:`CPUSyncBatchNorm` in place.

    The new modules take over the very same parameter and buffer objects, so an optimizer (or
    weight average) built on the model beforehand keeps updating them.
    """
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean = child.running_mean
            sync.running_var = child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def wrap(model: nn.Module, world: World, sync_bn: bool) -> nn.Module:
    """The module the loop trains: DDP around ``model`` when there are several processes."""
    if not world.active:
        return model
    if sync_bn:
        convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int, say: Callable[[str], None]) -> None:
    """``--threads N`` (0: torch's default): threads beyond this process's cores wait on each
    other and a step runs many times slower, so N is capped at the cores, with a note."""
    if not threads:
        return
    cores = cpu_cores()
    if threads > cores:
        say(
            f"note: --threads {threads} is more than the {cores} core(s) this process may run "
            f"on; using {cores} (threads beyond the cores only wait on each other)"
        )
        threads = cores
    torch.set_num_threads(threads)


def in_launched_world() -> bool:
    """True inside a process that torchrun or :func:`launch_local` started."""
    return "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def relaunch(
    processes: int,
    argv: list[str] | None,
    threads: int = 0,
    drop: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> int | None:
    """Start this command as ``processes`` local ranks and return their exit status; None
    when it should run right here (one process, or already a rank of a world).

    ``argv`` is what ``reslab.cli.main`` was given: None for this process's own command line,
    which the ranks repeat exactly (``sys.orig_argv``: interpreter flags and script or -m),
    less the words in ``drop`` and with ``extra`` added (what this process decided for them).
    """
    if processes <= 1 or in_launched_world():
        return None
    command = sys.orig_argv[1:] if argv is None else ["-m", "reslab", *argv]
    command = [*(arg for arg in command if arg not in drop), *extra]
    return launch_local(processes, command, threads)


def launch_local(processes: int, command: list[str], threads: int = 0) -> int:
    """Run ``python *command`` as ``processes`` ranks of one gloo world on this machine.

    Each rank gets torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...) and
    ``threads`` intra-op threads (0: the cores shared out evenly). SIGINT and SIGTERM are
    passed on, so every rank saves and stops at the same step. When a rank fails, the others
    are stopped rather than left waiting for it. Returns rank 0's exit status, or the first
    failure's when rank 0 succeeded.
    """
    per_rank = threads or max(1, cpu_cores() // processes)
    world = {
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": str(per_rank),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, *command],
            env={**os.environ, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(processes)
    ]

    def forward(signum, frame):
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(process.poll() is None for process in ranks):
            if failed_at is None and any(process.poll() not in (None, 0) for process in ranks):
                failed_at = time.monotonic()
                forward(signal.SIGTERM, None)
            elif failed_at is not None and time.monotonic() - failed_at > 30:
                for process in ranks:
                    if process.poll() is None:
                        process.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # a rank killed by signal N reports -N; a shell would say 128 + N
    codes = [code if code >= 0 else 128 - code for code in (p.returncode for p in ranks)]
    return codes[0] or next((code for code in codes if code), 0)
