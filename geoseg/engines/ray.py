"""The Ray engine: the only module that imports ray.

Why Ray Core tasks + an actor pool with explicit backpressure, not Ray Data: the writer of a scene is a
single consumer in the driver that must know, for every block, its scene, its id and whether it failed
(with the file and block named), so that failures can be counted against ``runtime.max_failed_blocks``,
finished blocks recorded for resume, and seams closed as blocks arrive. A bounded window of in-flight blocks
gives a hard memory bound (``max_in_flight_blocks`` x one block's read array) that does not depend on the
scene size, and cancelling that window on SIGINT/SIGTERM is immediate (a Ray Data pipeline stopped by SIGINT
was seen hanging in shutdown). Ray still does what it is good at: placement on GPUs (``num_gpus`` per actor,
fractional allowed), retries of tasks whose worker or node died (``max_retries``), restarting actors on a
surviving node (``max_restarts``), lineage reconstruction of lost read results, and moving arrays between
nodes through the object store (workers read inputs themselves; nothing is shipped through the driver but
finished block masks).

Per block:  read task (CPU)  ->  InferenceActor.predict (GPU when reserved)  ->  finish task (CPU:
polygonize)  ->  driver writer. Resumed blocks skip the first two. The read of the next blocks runs while
the actors compute, so an actor always has a block waiting (``2 x workers + 2`` in flight by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

import ray

from geoseg._memory import release_free_memory
from geoseg.blocks import BlockResult, WorkItem, failed_result, finish_block, read_block
from geoseg.config import JobConfig
from geoseg.errors import ConfigError
from geoseg.plan import ScenePlan

log = logging.getLogger("geoseg")

__all__ = ["ray_engine", "InferenceActor", "init_ray"]


def init_ray(cfg: JobConfig) -> bool:
    """Join ``runtime.address`` / ``RAY_ADDRESS`` or start a local Ray. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        rt = cfg.runtime
        # Logical CPUs: enough for the actor pool plus read/finish tasks even on a small machine, so the
        # embedded default can never deadlock with every CPU held by an actor.
        need = rt.workers * rt.cpus_per_worker + 2 * rt.cpus_per_task
        store_mb = rt.object_store_mb
        from geoseg import _reaper

        _reaper.start()  # ends this Ray's processes within a second or two of the driver, even after SIGKILL
        with _quiet_ray_start():
            ray.init(num_cpus=rt.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)),
                     object_store_memory=store_mb * 2**20 if store_mb else None,
                     include_dashboard=False, log_to_driver=True)
    return True


@contextlib.contextmanager
def _quiet_ray_start():
    """Starting a private local Ray prints a token-authentication WARNING every time; it is a notice about
    Ray's defaults, not a problem of the job, and a successful run must print no warnings."""
    names = ["ray._private.authentication.authentication_token_setup"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _resource_problem(cfg: JobConfig, gpus: float, have: dict) -> str | None:
    """What the actor pool needs and the cluster lacks now, in words; None when it fits."""
    rt = cfg.runtime
    need_cpu = rt.workers * rt.cpus_per_worker + rt.cpus_per_task
    if need_cpu > have.get("CPU", 0) + 1e-9:
        return (f"runtime.workers={rt.workers} x runtime.cpus_per_worker={rt.cpus_per_worker} plus "
                f"runtime.cpus_per_task={rt.cpus_per_task} need {need_cpu:g} CPUs; the Ray cluster has "
                f"{have.get('CPU', 0):g}. Lower them (fractions are allowed) or add nodes")
    if rt.device == "cuda" and not have.get("GPU", 0):
        return "runtime.device is 'cuda' but the Ray cluster has no GPUs; use runtime.device=auto or cpu, or add GPU nodes"
    if gpus and rt.workers * gpus > have.get("GPU", 0) + 1e-9:
        return (f"runtime.workers={rt.workers} x runtime.num_gpus_per_worker={gpus:g} need "
                f"{rt.workers * gpus:g} GPUs; the Ray cluster has {have.get('GPU', 0):g}")
    return None


def _check_resources(cfg: JobConfig, gpus: float) -> None:
    """Refuse a pool that can never be scheduled here (it would wait forever), naming the settings. With
    ``runtime.wait_for_resources_s`` (a cluster whose autoscaler adds nodes on demand, e.g. KubeRay with
    ``enableInTreeAutoscaling``), first wait that long for the resources to appear."""
    import time

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
            with contextlib.suppress(Exception):
                request_resources(bundles=[bundle] * rt.workers)
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

    def __init__(self, device: str, batch_size: int | None, autocast: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, no more
        self.settings = (device, batch_size, autocast)  # for the Predictor, built with the first block
        self.predictor = None

    def _predictor(self, model_box: list):
        # The model arrives with the first block, as a reference inside a list (not resolved per call), and
        # loads once. Not a constructor argument: an object-store argument of a restartable actor makes Ray
        # log an error-level line at every start (ray-project/ray#53727). A restarted actor loads it again
        # from the next block's call; the driver holds the reference for the whole job.
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
            pred = self._predictor(model_box).predict_block(block, data, valid)
        except Exception as e:
            return failed_result(plan, block, e)
        return BlockResult(plan.index, block.id, row, col, pred.mask, pred.tiles_inferred, pred.tiles_skipped,
                           pred.model_calls, node=ray.get_runtime_context().get_node_id())


def _read(plan: ScenePlan, row: int, col: int):
    block = plan.grid.block(row, col)
    release_free_memory()
    try:
        return read_block(plan, block)
    except Exception as e:
        return failed_result(plan, block, e)


def _finish(plan: ScenePlan, row: int, col: int, result: BlockResult | None, cfg: JobConfig) -> BlockResult:
    release_free_memory()
    return finish_block(plan, plan.grid.block(row, col), result, cfg)


# One malloc arena: torch's intra-op threads otherwise each keep an arena whose freed activation buffers of every
# tile shape seen stay resident, so the actor's peak crept up with the run's length. Not an mmap threshold:
# unmapping every activation made each forward pass slower (page faults). Numbers: benchmarks/README.md.
_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def _gpus_per_worker(cfg: JobConfig) -> float:
    if cfg.runtime.num_gpus_per_worker is not None:
        return cfg.runtime.num_gpus_per_worker
    if cfg.runtime.device == "cpu":
        return 0.0
    have = ray.cluster_resources().get("GPU", 0)
    # One GPU per worker when there are enough; else the workers share what there is.
    return min(1.0, have / cfg.runtime.workers) if have else 0.0


def ray_engine(plans: list[ScenePlan], items: list[WorkItem], cfg: JobConfig, model) -> Iterator[BlockResult]:
    """Yield each item's ``BlockResult`` (any order), keeping at most ``max_in_flight_blocks`` in flight."""
    # ray.init replaces SIGTERM's handler with one that kills the node and exits 1; the job's own (a clean stop
    # like Ctrl-C, exit 130) is put back here and stays after a Ray this job started is shut down.
    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    started = init_ray(cfg)
    rt = cfg.runtime
    read_task = ray.remote(num_cpus=rt.cpus_per_task, max_retries=3)(_read)
    finish_task = ray.remote(num_cpus=rt.cpus_per_task, max_retries=3)(_finish)
    actors: list = []
    pending: dict = {}
    load: dict[int, int] = {}
    previous = _install_sigterm()
    try:
        _check_output_location(cfg)
        need_model = any(not it.resume for it in items)
        if need_model:
            gpus = _gpus_per_worker(cfg)
            _check_resources(cfg, gpus)
            model_ref = ray.put(model)  # the weights travel once through the object store, not per block
            actor_cls = InferenceActor.options(
                num_cpus=rt.cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=-1,
                runtime_env={"env_vars": _WORKER_ENV},
            )
            threads = max(1, int(rt.cpus_per_worker))
            actors = [actor_cls.remote(rt.device, rt.batch_size, cfg.model.autocast, threads)
                      for _ in range(rt.workers)]
            load = {i: 0 for i in range(len(actors))}
            log.info("%d inference workers, %.2f GPU each", len(actors), gpus)
        window = rt.max_in_flight_blocks or 2 * rt.workers + 2
        queue = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                item = next(queue, None)
                if item is None:
                    exhausted = True
                    break
                plan = plans[item.scene]
                if item.resume:
                    ref = finish_task.remote(plan, item.row, item.col, None, cfg)
                    pending[ref] = (item, None)
                else:
                    a = min(load, key=load.get)
                    load[a] += 1
                    read_ref = read_task.remote(plan, item.row, item.col)
                    pred_ref = actors[a].predict.remote(plan, item.row, item.col, read_ref, [model_ref])
                    ref = finish_task.remote(plan, item.row, item.col, pred_ref, cfg)
                    pending[ref] = (item, a)
            if not pending:
                break
            # A timeout returns control to Python often, so SIGINT / SIGTERM are acted on at once.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                item, a = pending.pop(ref)
                if a is not None:
                    load[a] -= 1
                plan = plans[item.scene]
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:  # retries exhausted: report it as this block's failure
                    yield failed_result(plan, plan.grid.block(item.row, item.col), e)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True, recursive=True)
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
            _restore_sigterm(before)
        else:
            _restore_sigterm(previous)


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
