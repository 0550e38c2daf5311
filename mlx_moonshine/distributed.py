"""Data-parallel training and evaluation on MLX's own engine (`mx.distributed`), started by `mlx.launch`.

    mlx.launch -n 2 --backend ring -- mlx-moonshine train ...        two local processes
    mlx.launch --hostfile hosts.json -- mlx-moonshine train ...      several Macs (ring over TCP/Thunderbolt, MPI)

The rules every distributed code path here follows:

  * `--batch-size` stays the global batch. The global batches are built exactly as in one process (a pure
    function of the seed); process r trains on rows r, r+N, ... of each, and the token-weighted gradient sums,
    loss sums and token counts are averaged with `nn.average_gradients`, so every process applies the same
    update and the loss is the same token-weighted mean as in one process (up to the order of the sums).
  * Work that is cut into fixed groups (validation batches, WER decode batches, eval batches, base-model
    replay transcripts and teacher distributions) keeps the single-process groups and deals them round-robin
    (`World.map_groups`): each group is computed exactly as in one process and the results are gathered on
    every process, in group order.
  * Only rank 0 writes the run folder. The other processes write into a private temporary folder that starts
    as a copy of rank 0's (`World.local_folder`), so a resume needs the run folder on rank 0's disk only.
  * A process that dies or stalls stops the others: a lost ring connection or the launcher's SIGTERM becomes
    a `DistributedError`, and a watchdog ends a process that waits longer than MLX_MOONSHINE_DIST_TIMEOUT
    seconds (default 600) for the others.

Without a launcher `world()` is a single process and every helper is the identity.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .errors import MoonshineError

ENV_TIMEOUT = "MLX_MOONSHINE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds one process may wait in a collective for the others
# Set by mlx.launch (ring: MLX_RANK/MLX_HOSTFILE; nccl/jaccl: MLX_WORLD_SIZE) or mpirun (OMPI_*, PMI_*).
_LAUNCHER_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class DistributedError(MoonshineError):
    """Another process of a distributed run stopped, or the processes disagree."""


class World:
    """This process's place among the processes of one run (a single process: rank 0 of 1)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.timeout = float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT)
        self._waiting: Optional[tuple[str, float]] = None
        self._stopping = False
        if self.size > 1:
            threading.Thread(target=self._watchdog, daemon=True, name="mlx-moonshine-watchdog").start()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # -- failure handling ---------------------------------------------------------------------------

    def _watchdog(self) -> None:
        while True:
            time.sleep(1.0)
            waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout:
                sys.stderr.write(
                    f"error: process {self.rank} of {self.size} waited {self.timeout:.0f} s for the others while "
                    f"{waiting[0]}; one of them stopped or hangs. Stopping this one too (set {ENV_TIMEOUT} for a "
                    "longer wait); continue the run with --resume\n")
                sys.stderr.flush()
                os._exit(2)

    def _on_sigterm(self, signum, frame) -> None:
        if self._stopping:  # the launcher may signal twice; one error is enough
            return
        self._stopping = True
        raise DistributedError(f"process {self.rank} of {self.size} was stopped by the launcher because another "
                               "process of this run ended (see above: its error, or the launcher's line on how it "
                               "ended); continue the run with --resume")

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Run a collective under the watchdog; a lost peer becomes a DistributedError."""
        if self.size == 1:
            yield
            return
        self._waiting = (what, time.monotonic())
        try:
            yield
        except RuntimeError as e:  # the ring backend: "[ring] connection to a peer was lost"
            raise DistributedError(f"process {self.rank} of {self.size} lost the other processes while {what} "
                                   f"({e}); one of them stopped (see above). Continue the run with --resume") from e
        finally:
            self._waiting = None

    # -- collectives ------------------------------------------------------------------------------

    def reduce_step(self, acc):
        """Average a tree of per-process sums (gradients x tokens, loss x tokens, tokens) over the processes.

        The step divides the averaged gradient sum by the averaged token count, which equals the global
        sums' ratio: the token-weighted mean over the whole global batch.
        """
        if self.size == 1:
            return acc
        import mlx.core as mx
        import mlx.nn as nn

        with self.waiting("averaging gradients"):
            out = nn.average_gradients(acc, group=self.group)
            mx.eval(out)
        return out

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every process's `data`, in rank order, on every process."""
        if self.size == 1:
            return [data]
        import mlx.core as mx
        import numpy as np

        what = "gathering results"
        with self.waiting(what):
            # Each process sends len + 1, so a 0 can only mean a peer that is gone: the ring backend may
            # hand back zeros instead of raising when the other end of its socket died.
            lengths = np.zeros(self.size, np.int32)
            lengths[self.rank] = len(data) + 1
            lengths = np.array(mx.distributed.all_sum(mx.array(lengths), group=self.group)).tolist()
            if min(lengths) < 1 or lengths[self.rank] != len(data) + 1:
                raise self._lost(what)
            n = max(max(lengths) - 1, 1)
            buf = np.zeros(n, np.uint8)
            buf[: len(data)] = np.frombuffer(data, np.uint8)
            out = np.array(mx.distributed.all_gather(mx.array(buf), group=self.group))
        if out.size != n * self.size:
            raise self._lost(what)
        return [out[r * n: r * n + lengths[r] - 1].tobytes() for r in range(self.size)]

    def _lost(self, what: str) -> "DistributedError":
        return DistributedError(f"process {self.rank} of {self.size} lost the other processes while {what}; "
                                "one of them stopped (see above). Continue the run with --resume")

    def gather(self, obj) -> list:
        """Every process's JSON-able `obj`, in rank order (floats round-trip exactly)."""
        if self.size == 1:
            return [obj]
        try:
            return [json.loads(b) for b in self.gather_bytes(json.dumps(obj).encode("utf-8"))]
        except (ValueError, UnicodeDecodeError) as e:  # bytes from a peer that died mid-collective
            raise self._lost("gathering results") from e

    def broadcast(self, obj):
        """Rank 0's JSON-able `obj` on every process."""
        if self.size == 1:
            return obj
        return self.gather(obj if self.is_main else None)[0]

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (e.g. a time budget one process has used up)."""
        return any(self.gather(bool(flag))) if self.size > 1 else bool(flag)

    def shard(self, items: Sequence) -> tuple[list, list[int]]:
        """This process's rows of one global batch and their positions in it: rows r, r+N, ..."""
        positions = list(range(self.rank, len(items), self.size))
        return [items[i] for i in positions], positions

    def map_groups(self, groups: Sequence, fn: Callable) -> Iterator[list]:
        """Yield, round by round, `[fn(group) for each group of the round]` in group order, on every process.

        Group i is computed by process i % N; fn's results must be JSON-able. One process: one group a round.
        """
        if self.size == 1:
            for g in groups:
                yield [fn(g)]
            return
        for start in range(0, len(groups), self.size):
            i = start + self.rank
            mine = fn(groups[i]) if i < len(groups) else None
            yield self.gather(mine)[: min(self.size, len(groups) - start)]

    def map_all(self, groups: Sequence, fn: Callable) -> list:
        """`[fn(g) for g in groups]`, the groups shared out as in `map_groups`."""
        return [r for batch in self.map_groups(groups, fn) for r in batch]

    # -- files ------------------------------------------------------------------------------------

    def private_folder(self) -> Path:
        """A fresh temporary folder of this process, removed at exit (not a collective)."""
        private = Path(tempfile.mkdtemp(prefix=f"mlx-moonshine-rank{self.rank}-"))
        atexit.register(shutil.rmtree, private, True)
        return private

    def local_folder(self, folder, names: Optional[Iterable[str]] = None,
                     skip: Sequence[str] = ()) -> Path:
        """The folder this process reads and writes in place of rank 0's `folder`.

        Rank 0 (or a single process): `folder` itself. Others: a fresh private temporary folder holding a copy
        of rank 0's files of `folder` (only `names`, if given; top-level entries in `skip` left out), so reads
        give what rank 0 reads and writes never touch the real run folder.
        """
        if self.size == 1:
            return Path(folder)
        files = {}
        if self.is_main and folder is not None and Path(folder).is_dir():
            root = Path(folder)
            paths = [root / n for n in names] if names is not None else sorted(root.rglob("*"))
            for p in paths:
                rel = p.relative_to(root)
                if p.is_file() and rel.parts[0] not in skip and not rel.parts[0].startswith(".lock"):
                    files[rel.as_posix()] = base64.b64encode(p.read_bytes()).decode("ascii")
        files = self.broadcast(files)
        if self.is_main:
            return Path(folder)
        private = self.private_folder()
        for rel, data in files.items():
            (private / rel).parent.mkdir(parents=True, exist_ok=True)
            (private / rel).write_bytes(base64.b64decode(data))
        return private


_WORLD: Optional[World] = None


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process."""
    return any(os.environ.get(k) not in (None, "") for k in _LAUNCHER_ENV)


def world() -> World:
    """The processes of this run: `mx.distributed.init()` when a launcher started us, else one process."""
    global _WORLD
    if _WORLD is None:
        if not launched():
            _WORLD = World()
        else:
            import mlx.core as mx

            try:
                group = mx.distributed.init()
            except RuntimeError as e:
                raise DistributedError(f"cannot join the other processes of this run ({e}); check the hostfile "
                                       "and that every host can reach the others") from e
            _WORLD = World(group if group.size() > 1 else None)
            if _WORLD.size > 1:
                _join(_WORLD)
    return _WORLD


def _join(w: World) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, w._on_sigterm)
    if not w.is_main:  # one copy of the output, rank 0's; the others speak only to report an error
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")
        sys.stderr = _ErrorsOnly(sys.stderr, w.rank)
    # Every process runs the same code on the same data: check the code and arguments agree before any work.
    from . import __version__

    mine = dict(argv=sys.argv[1:], version=__version__)
    everyone = w.gather(mine)
    if any(o != everyone[0] for o in everyone):
        raise DistributedError("the processes of this run were started differently: " +
                               "; ".join(f"rank {r}: {o}" for r, o in enumerate(everyone)) +
                               "; give every host the same command and the same mlx-moonshine")


class _ErrorsOnly:
    """stderr of ranks > 0: only "error: ..." lines and tracebacks pass, marked with the rank."""

    def __init__(self, stream, rank: int):
        self.stream, self.rank, self.buffer_text, self.traceback = stream, rank, "", False

    def write(self, text: str) -> int:
        self.buffer_text += text
        *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            self.traceback = self.traceback or line.startswith("Traceback")
            if self.traceback or line.startswith("error:"):
                self.stream.write(f"[rank {self.rank}] {line}\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _reset_for_tests() -> None:
    global _WORLD
    _WORLD = None


__all__ = ["World", "world", "launched", "DistributedError", "ENV_TIMEOUT"]
