"""Darknet batches built ahead of use by worker processes: d2c train's batches, off the critical path.

Why this shape:
- Same tensors as d2c train (d2c.train.BatchSource / d2c.augment.detection_batch) for the same
  seed: the parent draws every random number in detection_batch's order
  (augment.plan_detection_batch, microseconds per image), workers replay them
  (augment.render_planned) and do the decoding, placing, HSV and flipping.
- No threads in the parent. Inside Caffe's own `caffe` binary the embedded interpreter keeps the
  GIL while C++ runs, so a parent-side feeder thread (multiprocessing.Queue, Pool) would stall
  until the next Python call. Jobs go out as small messages on one pipe per worker, written
  directly; images come back through shared memory (an anonymous shared mmap made before the
  fork), and only a few bytes of "done" per image travel back, so a worker never blocks on a
  full pipe while the parent is busy in the net.
- Bounded: `slots` mini-batches are in flight at most (planned, rendering or ready); a slot is
  reused only after its mini-batch was copied out.
- Clean shutdown: close() (also run by the owner's __del__, at interpreter exit, and by the
  garbage collector through weakref.finalize) tells the workers to stop and joins them, then
  terminates stragglers. Workers also die with their parent (Linux PR_SET_PDEATHSIG, plus a
  parent-pid check), so a killed trainer or `caffe` process leaves no orphans, and they ignore
  SIGINT so Ctrl-C reaches only the trainer.
Workers are forked (not spawned): inside the `caffe` binary sys.executable is not a Python that
could be re-executed, and fork shares the sample list and the slots without copying.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import mmap
import multiprocessing as mp
import os
import signal
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from d2c.errors import DatasetError, EngineError

F32 = np.float32
PR_SET_PDEATHSIG = 1
WORKER_CACHE_BYTES = 512 << 20
JOIN_SECONDS = 5.0


@dataclass(frozen=True)
class LoaderSettings:
    """What one Darknet batch needs (the cfg's values, as d2c train reads them)."""

    batch: int                  # mini-batch b
    subdivisions: int           # S: b*S images are drawn per Darknet iteration
    width: int
    height: int
    record_boxes: int           # truth row width / 5 (the train net's truth blob)
    loader_boxes: int           # boxes the loader keeps (the last head's max, at most record_boxes)
    jitter: float = 0.2
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    no_augment: bool = False


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphan workers)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(0)


def _worker(jobs: Connection, done: Connection, parent: int, samples: list, settings: LoaderSettings,
            buffer: mmap.mmap, slots: int) -> None:
    """Worker body: render planned images into the shared slots until told to stop."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ImportError, AttributeError):
        import cv2
        # 0 = run OpenCV's loops on the calling thread. Not 1: setNumThreads(n>0) rebuilds the
        # thread pool, and a fork taken while the parent's pool ran holds its locks in a state
        # that deadlocks there (seen as a hung worker after any threaded cv2 call in the parent).
        cv2.setNumThreads(0)
    from d2c.augment import render_planned
    from d2c.augment_kernel import SourceImage, keep_freed_memory, load_source

    keep_freed_memory()
    images, truths = _slot_views(buffer, slots, settings)
    cache: dict[str, SourceImage] = {}
    cached = 0
    s = settings
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):
            break
        if job is None:
            break
        slot, position, planned = job
        try:
            sample = samples[planned.index]
            key = str(sample.image_path)
            image = cache.get(key)
            if image is None:
                image = load_source(sample.image_path)
                if cached < WORKER_CACHE_BYTES:
                    cache[key] = image
                    cached += image.nbytes
            one = render_planned(image, sample, planned, s.width, s.height, max_boxes=s.loader_boxes, jitter=s.jitter,
                                 hue=s.hue, saturation=s.saturation, exposure=s.exposure, no_augment=s.no_augment,
                                 out=images[slot, position])
            truths[slot, position] = 0
            truths[slot, position, :one.truth.size] = one.truth
            done.send((slot, position, None))
        except Exception as exc:  # reported to the parent, which raises it with the sample named
            done.send((slot, position, f"{type(exc).__name__}: {exc}"))
    with contextlib.suppress(OSError):
        done.close()


def _slot_views(buffer: mmap.mmap, slots: int, s: LoaderSettings) -> tuple[np.ndarray, np.ndarray]:
    image_count = slots * s.batch * 3 * s.height * s.width
    images = np.frombuffer(buffer, F32, image_count).reshape(slots, s.batch, 3, s.height, s.width)
    truths = np.frombuffer(buffer, F32, slots * s.batch * s.record_boxes * 5, offset=image_count * 4)
    return images, truths.reshape(slots, s.batch, s.record_boxes * 5)


def _shutdown(processes: list, job_conns: list[Connection], done_conns: list[Connection]) -> None:
    """Stop the workers: a stop message, a bounded join, then terminate/kill (no orphans)."""
    for conn in job_conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send(None)
    for proc in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):   # never started, or already closed
            proc.join(JOIN_SECONDS)
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_SECONDS)
    for conn in (*job_conns, *done_conns):
        with contextlib.suppress(OSError):
            conn.close()


class PrefetchLoader:
    """Darknet mini-batches in d2c train's order, rendered ahead by `workers` processes.

    next_minibatch() returns (x (b, 3, h, w), truth (b, record_boxes*5)); S consecutive calls
    make one Darknet iteration (b*S picks drawn together, as detection_batch draws them).
    `rng` is consumed exactly as d2c train's BatchSource consumes its Generator.
    """

    def __init__(self, samples: list, settings: LoaderSettings, rng: np.random.Generator, *,
                 workers: int = 2, slots: int | None = None) -> None:
        if not samples:
            raise DatasetError("the loader has no samples")
        if workers < 1:
            raise DatasetError(f"the loader needs at least 1 worker, got {workers}")
        if settings.loader_boxes > settings.record_boxes:
            raise DatasetError(f"loader_boxes {settings.loader_boxes} > record_boxes {settings.record_boxes}")
        self.samples = samples
        self.settings = settings
        self.rng = rng
        self.slots = max(2, slots if slots is not None else settings.subdivisions + 1)
        s = settings
        size = self.slots * s.batch * (3 * s.height * s.width + s.record_boxes * 5) * 4
        self._buffer = mmap.mmap(-1, size)   # anonymous and MAP_SHARED: the forked workers write into it
        self._images, self._truths = _slot_views(self._buffer, self.slots, s)
        ctx = mp.get_context("fork")
        parent = os.getpid()
        self._jobs: list[Connection] = []
        self._done: list[Connection] = []
        self._processes: list[Any] = []
        for k in range(workers):
            job_read, job_write = ctx.Pipe(duplex=False)
            done_read, done_write = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, name=f"d2c-loader-{k}", daemon=True,
                               args=(job_read, done_write, parent, samples, s, self._buffer, self.slots))
            proc.start()
            job_read.close()
            done_write.close()
            self._jobs.append(job_write)
            self._done.append(done_read)
            self._processes.append(proc)
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._jobs, self._done)
        self._planned: deque[list] = deque()      # mini-batches planned, not yet sent (PlannedImage lists)
        self._in_flight: deque[tuple[int, list]] = deque()   # (slot, planned images), oldest first
        self._free = deque(range(self.slots))
        self._remaining = [0] * self.slots
        self._errors: dict[int, tuple[int, str]] = {}
        self._next_worker = 0
        self._iterations: deque[tuple[dict, np.ndarray]] = deque()   # (rng state before, picks) not yet consumed
        self._consumed_in_iteration = 0
        self.last_indices: np.ndarray | None = None
        self.iterations_planned = 0
        self._fill()

    # -- planning and dispatch -----------------------------------------------------------------
    def _plan_iteration(self) -> None:
        from d2c.augment import plan_detection_batch
        s = self.settings
        before = copy.deepcopy(self.rng.bit_generator.state)
        plan = plan_detection_batch(self.samples, s.batch * s.subdivisions, self.rng, no_augment=s.no_augment)
        self._iterations.append((before, np.array([p.index for p in plan])))
        for k in range(s.subdivisions):
            self._planned.append(plan[k * s.batch:(k + 1) * s.batch])
        self.iterations_planned += 1

    def _fill(self) -> None:
        """Send planned mini-batches to the workers while a slot is free."""
        while self._free:
            if not self._planned:
                self._plan_iteration()
            planned = self._planned.popleft()
            slot = self._free.popleft()
            self._remaining[slot] = len(planned)
            self._errors.pop(slot, None)
            for position, image in enumerate(planned):
                conn = self._jobs[self._next_worker]
                self._next_worker = (self._next_worker + 1) % len(self._jobs)
                try:
                    conn.send((slot, position, image))
                except OSError:
                    raise EngineError("a d2c loader worker exited unexpectedly") from None
            self._in_flight.append((slot, planned))

    def _collect(self, slot: int) -> None:
        """Read "done" messages until every image of `slot` is rendered."""
        while self._remaining[slot] > 0:
            ready = wait(self._done)
            for conn in ready:
                try:
                    done_slot, position, error = conn.recv()
                except (EOFError, OSError):
                    raise EngineError("a d2c loader worker exited unexpectedly (killed, or out of memory?)") from None
                self._remaining[done_slot] -= 1
                if error is not None and done_slot not in self._errors:
                    self._errors[done_slot] = (position, error)

    # -- the public side -----------------------------------------------------------------------
    def _take(self) -> int:
        """The slot of the next mini-batch, fully rendered (raises the first worker error)."""
        if not self._finalizer.alive:
            raise EngineError("the d2c loader is closed")
        slot, planned = self._in_flight.popleft()
        self._collect(slot)
        if slot in self._errors:
            position, error = self._errors.pop(slot)
            self._free.append(slot)
            self._fill()
            raise DatasetError(f"{self.samples[planned[position].index].image_path}: the loader failed: {error}")
        return slot

    def _release(self, slot: int) -> None:
        self._consumed_in_iteration += 1
        if self._consumed_in_iteration == self.settings.subdivisions:   # a whole Darknet iteration was used
            self._consumed_in_iteration = 0
            _state, self.last_indices = self._iterations.popleft()
        self._free.append(slot)
        self._fill()

    def rng_state(self) -> dict:
        """The Generator state as if no batch beyond the ones consumed had been drawn (what a
        snapshot must store so that a resumed run draws the same next batch)."""
        if self._consumed_in_iteration:
            raise EngineError("rng_state: in the middle of an iteration")
        return copy.deepcopy(self._iterations[0][0] if self._iterations else self.rng.bit_generator.state)

    def next_minibatch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next mini-batch (copies; the slot goes back to the workers at once)."""
        slot = self._take()
        x = np.array(self._images[slot], copy=True)
        truth = np.array(self._truths[slot], copy=True)
        self._release(slot)
        return x, truth

    def next_iteration(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """One Darknet iteration: S mini-batches (what d2c.train.BatchSource.next returns)."""
        return [self.next_minibatch() for _ in range(self.settings.subdivisions)]

    def copy_next_into(self, x: np.ndarray, truth: np.ndarray) -> None:
        """next_minibatch() written straight into caller arrays (Caffe's top blobs)."""
        slot = self._take()
        x[...] = self._images[slot]
        truth[...] = self._truths[slot]
        self._release(slot)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop and join the workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PrefetchBatchSource:
    """d2c train's BatchSource (same tensors, same Generator stream) with the pixel work done
    ahead by PrefetchLoader workers. The loader is started on first use and can be reset to a
    saved Generator state (resume, an interrupted or failed iteration): the batches drawn ahead
    are then dropped and drawn again from that state."""

    def __init__(self, samples: list, batch: int, subdivisions: int, width: int, height: int, *,
                 rng: np.random.Generator, record_boxes: int, loader_boxes: int, jitter: float, hue: float,
                 saturation: float, exposure: float, no_augment: bool, workers: int = 2) -> None:
        self.samples = samples
        self.batch, self.subdivisions, self.width, self.height = batch, subdivisions, width, height
        self.rng = rng
        self.settings = LoaderSettings(batch=batch, subdivisions=subdivisions, width=width, height=height,
                                       record_boxes=record_boxes, loader_boxes=min(loader_boxes, record_boxes),
                                       jitter=jitter, hue=hue, saturation=saturation, exposure=exposure,
                                       no_augment=no_augment)
        self.workers = workers
        self.last_indices: np.ndarray | None = None
        self._loader: PrefetchLoader | None = None

    def next(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._loader is None or self._loader.closed:
            self._loader = PrefetchLoader(self.samples, self.settings, self.rng, workers=self.workers)
        batches = self._loader.next_iteration()
        self.last_indices = self._loader.last_indices
        return batches

    def rng_state(self) -> dict:
        if self._loader is None or self._loader.closed:
            return copy.deepcopy(self.rng.bit_generator.state)
        return self._loader.rng_state()

    def reset(self, state: dict) -> None:
        """Drop everything drawn ahead and continue from `state`."""
        self.close()
        self.rng.bit_generator.state = state

    def close(self) -> None:
        """Stop the workers; the Generator is wound back to the batches actually used."""
        if self._loader is not None and not self._loader.closed:
            state = self._loader.rng_state()
            self._loader.close()
            self.rng.bit_generator.state = state
        self._loader = None

    @property
    def worker_pids(self) -> list[int]:
        return [] if self._loader is None else self._loader.worker_pids
