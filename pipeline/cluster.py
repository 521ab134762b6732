"""Ray: joining or starting a cluster, pools of codec-holding actors, and feeding them work.

    with actor_pool(Worker, *args, actors=n, address=a) as pool:      connect, start the actors
        for result in run_on_pool(pool, tasks, submit): ...         two tasks queued per actor,
                                                                     a dead actor's work re-sent
                                                                     leaving the block kills them

One actor holds one codec (its model loaded once). On a cluster with GPUs each actor asks for
`num_gpus=1`, so Ray pins it to a GPU of its own (it sets CUDA_VISIBLE_DEVICES per actor, and the
actor uses "cuda", its only visible device); otherwise actors run on CPUs.

Ray speaks only at the "diffarc" logger's debug level (`--log-level debug`): otherwise its start-up
warnings, its workers' output (unless that output is the job's: `connect(worker_output=True)`) and its
second account of errors the job reports itself stay quiet.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import ray
from ray.exceptions import ActorDiedError, RayActorError

from ..codecs.errors import ClusterError, DiffarcError
from .storage_failures import SETTINGS_ENV

logger = logging.getLogger("diffarc.cluster")
_connected_here = False
IN_FLIGHT_PER_ACTOR = 2  # tasks queued on each actor by run_on_pool


def connect(address: str | None = None, worker_output: bool = False) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local one for this job. `worker_output`: the
    workers' prints are the job's output (training's progress lines), so they reach this process always."""
    global _connected_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    verbose = logging.getLogger("diffarc").isEnabledFor(logging.DEBUG)
    if not verbose:
        # Ray reports a task error nobody fetched when its reference is dropped: after a job stops, a
        # traceback-long second account of what the job already said in one sentence.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    settings: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose or worker_output,
    }
    if address:
        _check_answers(address)
        settings["address"] = address
        told = {name: os.environ[name] for name in SETTINGS_ENV if name in os.environ}
        if told:  # a local cluster's workers inherit them; a joined one's are told
            settings["runtime_env"] = {"env_vars": told}
    else:
        settings["include_dashboard"] = False
    try:
        ray.init(**settings)
    except Exception as exc:
        # Ray says that a node did not come up (its raylet not registered within 30 s, as on an overloaded
        # machine) with a bare Exception, and that it cannot make its sockets or reach a GCS with an OSError;
        # anything else is a bug and keeps its traceback.
        if type(exc) is not Exception and not isinstance(exc, OSError):
            raise
        what = f"join the Ray cluster at {address}" if address else "start a Ray of this job's own"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"could not {what} ({reason}); the job did not run") from None
    _connected_here = True


def _check_answers(address: str) -> None:
    """A host:port where nothing listens is refused at once: Ray itself would retry for minutes, printing
    its own warnings. Other forms (auto, ray://…) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there (`ray start --head "
            f"--port={port}`), or leave out --address and RAY_ADDRESS to run on a Ray of this job's own"
        ) from None


def disconnect() -> None:
    """Leave the Ray that `connect` started or joined; a Ray the caller had started is left alone."""
    global _connected_here
    if _connected_here and ray.is_initialized():
        # Actor handles and object refs caught in reference cycles (an exception's traceback holds them) are
        # freed by whichever later collection finds them, in any thread; after the shutdown that ends the
        # process ("the core worker has already been shutdown"). Freed now, while Ray is up, they cannot.
        gc.collect()
        ray.shutdown()
    _connected_here = False


@dataclass(frozen=True)
class PoolShape:
    actors: int
    gpus_per_actor: int
    cpus_per_actor: float


def pool_shape(actors: int | None = None, gpus: bool = True, work: int | None = None) -> PoolShape:
    """One actor per GPU when the cluster has GPUs (and the work wants them: `gpus`), else one per CPU core;
    `actors` overrides the count. No more actors than `work`, the pieces of work there are: each actor
    loads the codec (its model, on its GPU), which an actor that gets nothing to do would load for nothing."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if gpus else 0
    count = actors or gpus or max(1, int(resources.get("CPU", 1)))
    if work is not None:
        count = max(1, min(count, work))
    return PoolShape(count, 1 if gpus else 0, 1)


def unwrapped(exc: BaseException) -> BaseException:
    """What Ray's wrappers hold: a task's or actor method's exception (`.cause`; the wrapper's text is a
    traceback), Ray Train a worker's (`.worker_failures`), Ray Data a map function's (the UserCodeException
    is raised from it). An actor constructor's exception is not held, only named in the wrapper's text."""
    seen: set[int] = set()
    while id(exc) not in seen and type(exc).__module__.startswith("ray."):
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        failures = getattr(exc, "worker_failures", None)
        if not isinstance(inner, BaseException) and isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException) and type(exc).__name__ == "UserCodeException":
            inner = exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def diffarc_error_in(exc: BaseException) -> DiffarcError | None:
    """The DiffarcError inside what Ray raised (`unwrapped`), or None."""
    found = unwrapped(exc)
    return found if isinstance(found, DiffarcError) else None


class ActorsLostError(DiffarcError):
    """The same piece of work lost its actor too often: the job stops rather than keep killing actors."""


class ActorPool(Sequence):
    """The job's actors, by position; an actor that dies is replaced, in its position, by a fresh one.

    Diffarc replaces dead actors itself instead of asking Ray to restart them (`max_restarts`): one
    mechanism, and every death is seen by `run_on_pool`, which sends the lost work to another actor.
    """

    def __init__(self, remote: Any, args: tuple, size: int):
        self._remote, self._args = remote, args
        self._actors = [remote.remote(*args) for _ in range(size)]
        self.replaced = 0

    def __getitem__(self, position):
        return self._actors[position]

    def __len__(self) -> int:
        return len(self._actors)

    def replace(self, position: int) -> None:
        ray.kill(self._actors[position])  # dead already, or unreachable: make sure it never comes back
        self._actors[position] = self._remote.remote(*self._args)
        self.replaced += 1

    def kill(self) -> None:
        for actor in self._actors:
            ray.kill(actor)


@contextmanager
def actor_pool(
    actor_class: type, *args: Any, actors: int | None = None, address: str | None = None, gpus: bool = True,
    work: int | None = None,
) -> Iterator[ActorPool]:
    """Actors of `actor_class(*args)`, shaped by `pool_shape(actors, gpus, work)`, alive for the `with` block.

    The actors are killed however the block is left (results consumed, an error, an interrupt), so a
    failed job does not leave actors holding GPUs and models in a cluster it joined.
    """
    connect(address)
    shape = pool_shape(actors, gpus, work)
    # SPREAD: on a cluster of CPU nodes the actors go one node after another instead of filling the
    # first (GPU actors spread anyway, one per GPU); a replacement goes wherever there is room.
    # An actor that reports its `progress` answers in a thread of its own while its work runs in the other.
    groups = {"concurrency_groups": {PROGRESS_GROUP: 1}} if hasattr(actor_class, "progress") else {}
    remote = ray.remote(**groups)(actor_class) if groups else ray.remote(actor_class)
    remote = remote.options(
        num_gpus=shape.gpus_per_actor, num_cpus=shape.cpus_per_actor, max_restarts=0, max_task_retries=0,
        scheduling_strategy="SPREAD",
    )
    pool = ActorPool(remote, args, shape.actors)
    try:
        yield pool
    finally:
        pool.kill()


PROGRESS_GROUP = "progress"  # the concurrency group of an actor's `progress` method


@contextmanager
def reported_progress(
    pool: ActorPool, on_progress: Callable[[int, int, int], None] | None, total: int, seconds: float = 1.0
) -> Iterator[None]:
    """While the block runs, tell `on_progress(done, total, failed)` every `seconds` how many items the
    pool's actors have done: each actor's `progress()` counts its items (and failed ones) over its life, so
    the count moves within a shard, not only when one ends. A replaced actor's last count is kept: the
    figure may run ahead of the truth by a lost shard's items until the job's end says it exactly."""
    if on_progress is None:
        yield
        return
    stop = threading.Event()
    counts: dict[int, tuple[int, int]] = {}  # id of an actor handle → its (done, failed)

    def poll() -> None:
        while not stop.wait(seconds):
            handles = list(pool)
            for handle, answer in zip(handles, [handle.progress.remote() for handle in handles]):
                try:
                    counts[id(handle)] = ray.get(answer, timeout=seconds)
                except Exception:  # dead or busy starting: its last count stands
                    continue
            done, failed = (sum(c[i] for c in counts.values()) for i in (0, 1))
            on_progress(min(done, total), total, failed)

    thread = threading.Thread(target=poll, name="diffarc-progress-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def torch_device() -> str:
    """The device an actor should use: its own GPU when Ray gave it one, else the CPU."""
    if not ray.get_gpu_ids():
        return "cpu"  # without importing torch: classical-codec actors start faster
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_worker(device: str) -> dict:
    return {
        "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": device,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }  # fmt: skip


@dataclass
class _Work:
    task: Any
    lost_on: tuple[int, ...] = ()  # pool positions whose actor died running it, in order


def run_on_pool(
    pool: ActorPool,
    tasks: Iterable[Any],
    submit: Callable[[Any, Any], ray.ObjectRef],
    in_flight_per_actor: int = IN_FLIGHT_PER_ACTOR,
    max_losses: int = 3,
) -> Iterator[Any]:
    """Feed tasks to actors, at most `in_flight_per_actor` queued on each, yielding results as they finish.

    Two per actor keep an actor busy while the driver handles the previous result; tasks are pulled
    from `tasks` lazily, so a long listing streams through instead of being submitted all at once.

    A task whose actor dies (killed, out of memory, its node lost) is sent again, before new tasks, to
    an actor in another position when there is one, and the dead actor is replaced. Results stay
    "exactly once": a lost task's result never arrived. Only a task that has lost its actor
    `max_losses` times stops the job (ActorsLostError): then the work itself kills actors, and sending
    it on would only kill more. An actor whose constructor raises is no lost actor but a failed job: its
    error is raised as it is.
    """
    tasks = iter(tasks)
    # Round-robin order, so the first tasks spread over all actors instead of queueing on the first.
    free = deque(position for _ in range(in_flight_per_actor) for position in range(len(pool)))
    lost: deque[_Work] = deque()
    running: dict[ray.ObjectRef, tuple[int, Any, _Work]] = {}  # → position, the actor there, the work
    exhausted = False
    while True:
        while free:
            work, position = _next_work(free, lost, len(pool))
            if work is None and not exhausted:
                task = next(tasks, _END)
                exhausted = task is _END
                work, position = (None, None) if exhausted else (_Work(task), free.popleft())
            if work is None:
                break
            running[submit(pool[position], work.task)] = (position, pool[position], work)
        if not running:
            return
        ready, _ = ray.wait(list(running), num_returns=1)
        position, actor, work = running.pop(ready[0])
        free.append(position)
        try:
            result = ray.get(ready[0])
        except RayActorError as exc:
            if exc.actor_init_failed:
                raise
            reason = str(exc).splitlines()[0]
            if len(work.lost_on) + 1 >= max_losses:
                raise ActorsLostError(
                    f"one piece of work lost its actor {max_losses} times ({reason}); stopping rather than "
                    "losing more. Finished work is kept: run the command again to resume"
                ) from None
            lost.append(_Work(work.task, (*work.lost_on, position)))
            # Replaced once Ray says the actor is dead; an unreachable one (its node being lost) may still
            # answer, and its work is sent elsewhere meanwhile.
            replaced = isinstance(exc, ActorDiedError) and pool[position] is actor  # not yet by a sibling task
            if replaced:
                pool.replace(position)
            logger.warning(
                "work lost its actor (%s); it goes to another%s", reason,
                " and a fresh actor takes the dead one's place" if replaced else "",
            )  # fmt: skip
            continue
        yield result


_END = object()


def _next_work(free: deque, lost: deque, positions: int) -> tuple[_Work | None, int | None]:
    """The first lost task with a free position it was not lost on (any position, once it was lost on
    all of them), and that position; (None, None) when no lost task can go now."""
    for work in lost:
        allowed = [p for p in free if p not in work.lost_on or len(set(work.lost_on)) >= positions]
        if allowed:
            lost.remove(work)
            free.remove(allowed[0])
            return work, allowed[0]
    return None, None
