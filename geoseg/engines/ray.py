"""The Ray engine: the only module that imports ray.

Why Ray Core tasks + an actor pool with explicit backpressure, not Ray Data: the driver must know, for every
block, its scene, its id and whether it failed (with the file and block named), so that failures are counted
against ``runtime.max_failed_blocks`` and each result goes to its scene's writer actor, which records finished
blocks for resume and closes seams as blocks arrive. A bounded window of in-flight blocks gives a hard memory bound
(``max_in_flight_blocks`` x one block's read array) that does not depend on the scene size, and cancelling that
window on SIGINT/SIGTERM is immediate (a Ray Data pipeline stopped by SIGINT was seen hanging in shutdown). Ray
still does what it is good at: placement on GPUs (``num_gpus`` per actor, fractional allowed), retries of tasks
whose worker or node died (``max_retries``), lineage reconstruction of lost read results, and moving arrays
between nodes through the object store (workers read inputs themselves; results go from workers to writers).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from typing import Callable, Iterator

import ray

from geoseg._memory import release_free_memory
from geoseg.blocks import (BlockOutcome, BlockResult, WorkItem, failed_result, finish_block, predicted_result,
                           read_block)
from geoseg.config import JobConfig
from geoseg.errors import ConfigError, GeosegError, StorageError
from geoseg.plan import ScenePlan

log = logging.getLogger("geoseg")

__all__ = ["RayEngine", "InferenceActor", "WriterActor", "init_ray"]


def init_ray(cfg: JobConfig) -> bool:
    """Join ``runtime.address`` / ``RAY_ADDRESS`` or start a local Ray. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        rt = cfg.runtime
        # Logical CPUs: the actor pool plus read/finish tasks, so an embedded default never deadlocks
        need = rt.workers * rt.cpus_per_worker + rt.writers * rt.cpus_per_writer + 2 * rt.cpus_per_task
        store_mb = rt.object_store_mb
        from geoseg import _reaper

        _reaper.start()  # ends this Ray's processes within a second or two of the driver, even after SIGKILL
        with _quiet_ray_start():
            # address="local": a private Ray even when `ray start` left a cluster on this machine (ray.init would
            # join that one, where num_cpus may not be given)
            ray.init(address="local", num_cpus=rt.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)),
                     object_store_memory=store_mb * 2**20 if store_mb else None,
                     include_dashboard=False, log_to_driver=True)
    return True


@contextlib.contextmanager
def _quiet_ray_start():
    """Starting a private local Ray prints a token-authentication WARNING every time; it is a notice about
    Ray's defaults, not a problem of the job, and a successful run must print no warnings."""
    names = ["ray._private.authentication.authentication_token_setup",
             "ray._private.worker"]  # "Started a local Ray instance." at INFO: a notice, not the job's output
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _resource_problem(cfg: JobConfig, gpus: float | None, have: dict) -> str | None:
    """What the job needs and the cluster lacks now, in words; None when it fits. ``gpus`` per inference
    worker, None when no block needs the model (a resumed job: writers and tasks only)."""
    rt = cfg.runtime
    workers = rt.workers if gpus is not None else 0
    need_cpu = workers * rt.cpus_per_worker + rt.writers * rt.cpus_per_writer + rt.cpus_per_task
    if need_cpu > have.get("CPU", 0) + 1e-9:
        parts = [f"runtime.workers={rt.workers} x runtime.cpus_per_worker={rt.cpus_per_worker:g}"] if workers else []
        parts += [f"runtime.writers={rt.writers} x runtime.cpus_per_writer={rt.cpus_per_writer:g}",
                  f"runtime.cpus_per_task={rt.cpus_per_task:g}"]
        return (f"{' plus '.join(parts)} need {need_cpu:g} CPUs; the Ray cluster has "
                f"{have.get('CPU', 0):g}. Lower them (fractions are allowed) or add nodes")
    if gpus is None:
        return None
    if rt.device == "cuda" and not have.get("GPU", 0):
        return "runtime.device is 'cuda' but the Ray cluster has no GPUs; use runtime.device=auto or cpu, or add GPU nodes"
    if gpus and rt.workers * gpus > have.get("GPU", 0) + 1e-9:
        return (f"runtime.workers={rt.workers} x runtime.num_gpus_per_worker={gpus:g} need "
                f"{rt.workers * gpus:g} GPUs; the Ray cluster has {have.get('GPU', 0):g}")
    return None


def _check_resources(cfg: JobConfig, gpus: float | None) -> None:
    """Refuse a pool that can never be scheduled here (it would wait forever), naming the settings. With
    ``runtime.wait_for_resources_s`` (a cluster whose autoscaler adds nodes on demand, e.g. KubeRay with
    ``enableInTreeAutoscaling``), first wait that long for the resources to appear."""
    wait_s = cfg.runtime.wait_for_resources_s
    t0 = time.monotonic()
    said = False
    while True:
        problem = _resource_problem(cfg, gpus, ray.cluster_resources())
        if problem is None:
            return
        if time.monotonic() - t0 >= wait_s:
            raise ConfigError(problem + (f" (after waiting {wait_s:g} s for the autoscaler)" if wait_s else ""))
        if not said:
            log.info("waiting up to %g s for the cluster to add resources: %s", wait_s, problem)
            said = True
        if wait_s:
            # a resource request makes Ray's autoscaler start the nodes the pool needs, before any actor exists
            from ray.autoscaler.sdk import request_resources

            rt = cfg.runtime
            bundle = {"CPU": rt.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
            bundles = ([bundle] * rt.workers if gpus is not None else []) + [{"CPU": rt.cpus_per_writer}] * rt.writers
            with contextlib.suppress(Exception):
                request_resources(bundles=bundles)
        time.sleep(min(2.0, max(0.0, wait_s - (time.monotonic() - t0))))


def _check_output_location(cfg: JobConfig) -> None:
    """Block records and outputs of a local ``output.dir`` must be one directory for every node: refuse a
    multi-node cluster unless the operator says it is a shared volume (S3 outputs always work)."""
    from geoseg.io import store

    if store.is_s3(cfg.output.dir) or cfg.output.shared_filesystem:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(
            f"output.dir {cfg.output.dir!r} is a local path and the Ray cluster has {len(nodes)} nodes, so "
            "blocks finished on other nodes would land on their own disks; write to s3://... or, if that path "
            "is one shared volume mounted on every node, set output.shared_filesystem=true"
        )


@ray.remote
class InferenceActor:
    """Holds one model on its device (loaded once) and predicts whole blocks, tiles batched."""

    def __init__(self, device: str, batch_size: int | None, autocast: str, threads: int = 1, tta: str | None = None):
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, no more
        self.settings = (device, batch_size, autocast, tta)  # for the Predictor, built with the first block
        self.predictor = None

    def _predictor(self, model_box: list):
        # The model arrives with the first block, as a reference in a list (not resolved per call), and loads
        # once. Not a constructor argument: Ray logs an error-level line for an actor's object-store argument
        # (ray-project/ray#53727). A replacement loads it from its first block (the driver holds the reference).
        if self.predictor is None:
            from geoseg.infer import Predictor

            self.predictor = Predictor(ray.get(model_box[0]), *self.settings)
        return self.predictor

    def predict(self, plan: ScenePlan, row: int, col: int, read, model_box: list) -> BlockResult:
        block = plan.grid.block(row, col)
        if isinstance(read, BlockResult):  # the read task already failed
            return read
        data, valid = read
        try:
            pred = self._predictor(model_box).predict_block(block, data, valid, confidence=plan.confidence)
        except Exception as e:
            return failed_result(plan, block, e)
        ctx = ray.get_runtime_context()
        return predicted_result(plan, block, pred, ctx.get_actor_id(), node=ctx.get_node_id())


def _read(plan: ScenePlan, row: int, col: int):
    block = plan.grid.block(row, col)
    release_free_memory()
    try:
        return read_block(plan, block)
    except Exception as e:
        return failed_result(plan, block, e)


def _finish(plan: ScenePlan, row: int, col: int, result: BlockResult | None,
            cfg: JobConfig) -> tuple[str | None, BlockResult]:
    """The finish task: (the block's error or None, for the driver; the result, for the scene's writer)."""
    release_free_memory()
    out = finish_block(plan, plan.grid.block(row, col), result, cfg)
    return out.error, out


# One malloc arena: torch's intra-op threads each kept an arena of freed activations (peak crept up with run length;
# an mmap threshold instead made forward passes page-fault). The writer: Arrow's default pool (mimalloc) unmaps a
# Parquet row group's buffers and faults them in again, 2x jemalloc's time. Numbers: benchmarks/README.md.
_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
_WRITER_ENV = {**_WORKER_ENV, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}


def _gpus_per_worker(cfg: JobConfig) -> float:
    if cfg.runtime.num_gpus_per_worker is not None:
        return cfg.runtime.num_gpus_per_worker
    if cfg.runtime.device == "cpu":
        return 0.0
    have = ray.cluster_resources().get("GPU", 0)
    # One GPU per worker when there are enough; else the workers share what there is.
    return min(1.0, have / cfg.runtime.workers) if have else 0.0


@ray.remote
class WriterActor:
    """Hosts the writers (``stitch.SceneWriter``) of the scenes given to it: mask, seam merge, vector outputs,
    block records and run record are all written here, off the driver. Block results arrive by reference and
    Ray resolves them here, so masks and polygons go from the workers to the writer directly."""

    def __init__(self):
        self.writers: dict = {}
        # its modules load now, while the driver plans, not at the first opening (which the driver waits for)
        import geoseg.models.card, geoseg.stitch, geoseg.vectorize.sink, geoseg.write.vectors  # noqa: F401, E401

    def open(self, plan: ScenePlan, cfg: JobConfig, card) -> None:
        from geoseg.stitch import SceneWriter

        self.writers[plan.index] = w = SceneWriter(plan, cfg, card)
        w.own_process = True  # run.json gets this process's CPU time (geoseg.stitch.SceneWriter)

    def add(self, scene: int, block, result: BlockResult) -> None:
        self.writers[scene].add(block, result)

    def finish(self, scene: int, timings: dict) -> dict:
        return self.writers.pop(scene).finish(timings)

    def abort(self, scene: int) -> None:
        w = self.writers.pop(scene, None)
        if w is not None:
            w.abort()


def _get(ref, timeout: float | None = None):
    """``ray.get`` that raises geoseg's own error (or an interrupt) as itself, not wrapped in a RayTaskError."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (GeosegError, KeyboardInterrupt)):
            raise cause from None
        raise


class _RemoteWriter:
    """The driver's handle on one scene's writer in a ``WriterActor``: the same calls as a ``SceneWriter``.

    At most ``max_pending`` blocks wait in the writer: beyond that ``add`` waits, which holds back scheduling
    (a slow writer cannot make the object store grow without bound). If the writer's actor dies (its node was
    lost), a new writer takes over: the blocks the old one had taken come back from their block records (as
    on resume) and the ones in flight are sent again, so the outputs are the same.
    """

    def __init__(self, engine: RayEngine, plan: ScenePlan, card, max_pending: int):
        self.engine = engine
        self.plan = plan
        self.card = card
        self.scene = plan.index
        self.max_pending = max_pending
        self.unacked: collections.deque = collections.deque()  # (ack, block, result ref)
        self.taken: list = []  # blocks the writer has acknowledged
        self.timings: dict | None = None
        self.record_ref = None
        self.actor = engine.writer_for(self.scene)
        self.opened = self.actor.open.remote(plan, engine.cfg, card)

    def add(self, block, result_ref) -> None:
        self.unacked.append((self.actor.add.remote(self.scene, block, result_ref), block, result_ref))
        while self.unacked and (len(self.unacked) > self.max_pending or _ready(self.unacked[0][0])):
            self._settle()

    def _check_opened(self) -> None:
        """Raise a setting the writer refused when it opened the scene (once, before its blocks)."""
        if self.opened is not None:
            _get(self.opened)
            self.opened = None

    def _settle(self) -> None:
        ack, block, _ = self.unacked[0]
        try:
            self._check_opened()
            _get(ack)  # a writer's failure (a full disk) surfaces here, at once
        except ray.exceptions.RayActorError:
            self._replace()
            return
        self.unacked.popleft()
        self.taken.append(block)

    def _replace(self) -> None:
        """A new writer for this scene, given everything the lost one had."""
        log.warning("the writer of %s was lost (its node died?); a new writer takes over", self.plan.path)
        self.actor = self.engine.replace_writer(self.actor, self.scene)
        self.opened = self.actor.open.remote(self.plan, self.engine.cfg, self.card)
        stored = [(b, self.engine.stored_result(self.plan, b)) for b in self.taken]
        self.taken = []
        again = [(b, ref) for _, b, ref in self.unacked]
        self.unacked.clear()
        for b, ref in stored + again:
            self.unacked.append((self.actor.add.remote(self.scene, b, ref), b, ref))
        if self.timings is not None:
            self.record_ref = self.actor.finish.remote(self.scene, self.timings)

    def finish(self, timings: dict) -> _RemoteWriter:
        """Ask the writer to complete the scene (after the blocks it has, in order); returns this handle, the
        promise of the run record (``RayEngine.result``)."""
        self.timings = timings
        self.record_ref = self.actor.finish.remote(self.scene, timings)
        return self

    def record(self) -> dict:
        """The run record, once every block was taken and the writer finished."""
        while True:
            try:
                self._check_opened()
                while self.unacked:
                    self._settle()
                return _get(self.record_ref)
            except ray.exceptions.RayActorError:
                self._replace()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            ray.get(self.actor.abort.remote(self.scene), timeout=30)


def _actor_died(e: BaseException) -> bool:
    """Did this failure come from an actor that died (rather than from the work itself)?"""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, ray.exceptions.RayActorError):
            return True
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return False


def _ready(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


class RayEngine:
    """Blocks on a local or remote Ray cluster: read tasks, a pool of ``InferenceActor``s, finish tasks, and
    ``WriterActor``s that write the scenes; at most ``max_in_flight_blocks`` blocks in flight. The driver
    only schedules, counts failures and collects run records."""

    name = "ray"

    def __init__(self, cfg: JobConfig, model):
        self.cfg = cfg
        self.model = model
        self.actors: list = []
        self.writer_actors: list = []
        self.pending: dict = {}
        self.started = False
        self._before = self._previous = None
        self._opened = 0
        self.model_ref = None

    def __enter__(self) -> RayEngine:
        # ray.init replaces SIGTERM's handler with one that kills the node and exits 1; the job's own (a clean
        # stop like Ctrl-C, exit 130) is put back here and stays after a Ray this job started is shut down.
        on_main = threading.current_thread() is threading.main_thread()
        self._before = signal.getsignal(signal.SIGTERM) if on_main else None
        self.started = init_ray(self.cfg)
        self._previous = _install_sigterm()
        try:
            _check_output_location(self.cfg)
            self._prestart()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        rt = self.cfg.runtime
        self.task = ray.remote(num_cpus=rt.cpus_per_task, max_retries=3)
        self.read_task = self.task(_read)
        self.finish_task = ray.remote(num_cpus=rt.cpus_per_task, max_retries=3, num_returns=2)(_finish)
        return self

    def map(self, fn: Callable, args: list[tuple]) -> list:
        """``fn`` over argument tuples as tasks on the cluster, in parallel; results in order (the first
        failure in order is raised as itself)."""
        remote = self.task(fn)
        return [_get(ref) for ref in [remote.remote(*a) for a in args]]

    def call(self, fn: Callable, *args):
        """``fn(*args)`` as one task on the cluster (on a joined cluster the driver may not even see the output
        location); on a private local Ray, here (the same machine, without a task's round trip)."""
        if self.started:
            return fn(*args)
        return _get(self.task(fn).remote(*args))

    def _prestart(self) -> None:
        """Check the cluster's resources (waiting for an autoscaler if configured) and start the inference actors
        and the first writer now, so that their processes start (Python, torch, GDAL) while the driver plans the
        scenes: seconds off every job's start."""
        cfg, rt = self.cfg, self.cfg.runtime
        gpus = _gpus_per_worker(cfg)
        _check_resources(cfg, gpus)
        # No Ray restarts: a restarting actor holds its blocks until back (never, with no room on any node); the
        # engine sends them to live actors and starts a replacement.
        self._actor_cls = InferenceActor.options(
            num_cpus=rt.cpus_per_worker, num_gpus=gpus, max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": _WORKER_ENV},
        )
        self._actor_args = (rt.device, rt.batch_size, cfg.model.autocast, max(1, int(rt.cpus_per_worker)),
                            cfg.model.tta)
        self.actors = [self._actor_cls.remote(*self._actor_args) for _ in range(rt.workers)]
        self.writer_actors.append(self._new_writer())
        self._gpus = gpus

    def _start_pool(self, items: list[WorkItem]) -> None:
        """The model goes to the object store for the inference actors; a job whose every block is stored (a
        resume) needs no model and lets them go."""
        if not any(not it.resume for it in items):
            for a in self.actors:
                ray.kill(a)
            self.actors = []
            return
        self.model_ref = ray.put(self.model)  # the weights travel once through the object store
        log.info("%d inference workers, %.2f GPU each", len(self.actors), self._gpus)

    def open_writer(self, plan: ScenePlan, card) -> _RemoteWriter:
        """The scene's writer, in one of up to ``runtime.writers`` writer actors (round robin). The first scene's
        opening is awaited, so a refused setting fails before any compute; later ones are not (a failure
        surfaces with the scene's blocks)."""
        first = self._opened == 0
        window = self.cfg.runtime.max_in_flight_blocks or 2 * self.cfg.runtime.workers + 2
        w = _RemoteWriter(self, plan, card, max_pending=window)
        if first:
            _get(w.opened)
        return w

    def writer_for(self, scene: int):
        """The writer actor for a newly opened scene (started on first need, then round robin)."""
        if len(self.writer_actors) < self.cfg.runtime.writers:
            self.writer_actors.append(self._new_writer())
        actor = self.writer_actors[self._opened % len(self.writer_actors)]
        self._opened += 1
        return actor

    def replace_writer(self, dead, scene: int):
        """A live writer actor in place of ``dead`` (one replacement for every scene it held)."""
        for k, a in enumerate(self.writer_actors):
            if a == dead:
                self.writer_actors[k] = self._new_writer()
                return self.writer_actors[k]
        return next((a for a in self.writer_actors), None) or self.writer_for(scene)

    def _new_writer(self):
        # named (geoseg-writer-...) so that operators and tests can find the writers of a running job
        return WriterActor.options(num_cpus=self.cfg.runtime.cpus_per_writer, runtime_env={"env_vars": _WRITER_ENV},
                                   name=f"geoseg-writer-{uuid.uuid4().hex[:12]}").remote()

    def stored_result(self, plan: ScenePlan, block):
        """A block's result read back from its block record, as a reference (the resume path)."""
        _, result = self.finish_task.remote(plan, block.row, block.col, None, self.cfg)
        return result

    def result(self, pending: _RemoteWriter) -> dict:
        """A finished scene's run record, from its writer."""
        return pending.record()

    def results(self, plans: list[ScenePlan], items: list[WorkItem]) -> Iterator[BlockOutcome]:
        """Each item's outcome (any order); the block's result stays in the object store for its writer.

        An inference actor that dies (its node was lost, or it was killed) is dropped from the pool and a
        replacement is started; its blocks go again to the live actors, and the replacement takes blocks once
        it is up (where the cluster has room for it). So a lost node never stalls the job while another
        actor lives."""
        self._start_pool(items)
        rt = self.cfg.runtime
        load = {i: 0 for i in range(len(self.actors))}
        starting: dict[int, object] = {}  # replacement actors not yet up: index -> their ready reference
        window = rt.max_in_flight_blocks or 2 * rt.workers + 2
        # The config and each scene's plan go to the object store once, not pickled into every task.
        cfg_ref = ray.put(self.cfg)
        plan_refs: dict[int, object] = {}

        def plan_ref(scene: int):
            if scene not in plan_refs:
                if len(plan_refs) > 4:  # scenes come one after another: keep the recent ones
                    plan_refs.pop(next(iter(plan_refs)))
                plan_refs[scene] = ray.put(plans[scene])
            return plan_refs[scene]

        queue = collections.deque(items)
        again: collections.deque = collections.deque()  # blocks whose actor died, sent again first
        pending = self.pending
        waiting_said = False
        while True:
            if starting:  # replacements that came up join the pool
                up, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)
                for k in [k for k, r in starting.items() if r in up]:
                    del starting[k]
                    load[k] = 0
            while (again or queue) and len(pending) < window:
                item = (again or queue)[0]
                if not item.resume and not load:
                    if not waiting_said:
                        log.warning("no inference worker is alive; waiting for a replacement to start")
                        waiting_said = True
                    break
                (again or queue).popleft()
                plan = plan_ref(item.scene)
                if item.resume:
                    status, result = self.finish_task.remote(plan, item.row, item.col, None, cfg_ref)
                    pending[status] = (item, None, result)
                else:
                    a = min(load, key=load.get)
                    load[a] += 1
                    read_ref = self.read_task.remote(plan, item.row, item.col)
                    pred_ref = self.actors[a].predict.remote(plan, item.row, item.col, read_ref, [self.model_ref])
                    status, result = self.finish_task.remote(plan, item.row, item.col, pred_ref, cfg_ref)
                    pending[status] = (item, a, result)
            if not pending and not again and not queue:
                break
            # A timeout returns control to Python often, so SIGINT / SIGTERM are acted on at once.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5) if pending else ([], [])
            if not pending:
                time.sleep(0.5)
            for ref in ready:
                item, a, result = pending.pop(ref)
                if a in load:
                    load[a] -= 1
                plan = plans[item.scene]
                block = plan.grid.block(item.row, item.col)
                try:
                    error = ray.get(ref)
                except ray.exceptions.RayError as e:
                    if isinstance(getattr(e, "cause", None), StorageError):  # the output location, not the block
                        raise e.cause from None
                    if a is not None and _actor_died(e):
                        with contextlib.suppress(Exception):  # fetched: Ray need not report it as unhandled
                            ray.get(result, timeout=0)
                        if a in load:
                            del load[a]
                            new = len(self.actors)  # the replacement's index (it is appended)
                            starting[new] = self._replace_actor(a)
                        again.append(item)
                        continue
                    # retries exhausted: report it as this block's failure
                    failed = failed_result(plan, block, e)
                    yield BlockOutcome(item.scene, block.id, item.row, item.col, failed.error, ray.put(failed))
                    continue
                waiting_said = False
                yield BlockOutcome(item.scene, block.id, item.row, item.col, error, result)

    def _replace_actor(self, a: int):
        """Start a new inference actor in place of dead actor ``a``; returns its readiness reference."""
        log.warning("inference worker %d was lost; its blocks go to the others and a replacement starts", a)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[a])
        actor = self._actor_cls.remote(*self._actor_args)
        self.actors.append(actor)
        return actor.__ray_ready__.remote()

    def __exit__(self, *exc) -> None:
        for ref in (refs := list(self.pending)):
            ray.cancel(ref, force=True, recursive=True)
        if refs:  # the cancelled tasks end before the job returns: none writes a block record after it
            ray.wait(refs, num_returns=len(refs), timeout=10)
        self.pending.clear()
        for a in self.actors + self.writer_actors:
            ray.kill(a)
        self.actors, self.writer_actors = [], []
        if self.started:
            ray.shutdown()
            _restore_sigterm(self._before)
        else:
            _restore_sigterm(self._previous)


def _install_sigterm():
    """Turn SIGTERM (a cluster scheduler stopping the job) into the same clean stop as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, _stop)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
