"""A watchdog that ends the Ray processes of an embedded local Ray when its driver dies.

Ray's own processes notice a dead driver only slowly: after a SIGKILL of the driver, the dashboard and
runtime-env agents were seen alive for 1-2 minutes, and a scheduler that restarts the job meanwhile finds a
machine still busy. ``start(pid)`` spawns one small process (stdlib + psutil, no Ray, no torch) in its own
session that remembers the driver's Ray descendants while the driver lives, and kills those that are left
within about a second of the driver's exit, however it ended. Only processes that descend from the driver
and look like Ray's are touched; another job's Ray on the same machine is never seen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["start"]

_POLL_S = 0.5
_RAY_MARKERS = ("ray", "gcs_server", "raylet", "default_worker.py")


def start(driver_pid: int | None = None) -> subprocess.Popen:
    """Spawn the watchdog for ``driver_pid`` (default: this process)."""
    pid = driver_pid or os.getpid()
    return subprocess.Popen(
        # -P: not the package folder on sys.path (its io/ would shadow the standard library's io)
        [sys.executable, "-P", __file__, str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the job's terminal must not stop the watchdog too
        close_fds=True,
    )


def _is_ray(proc) -> bool:
    try:
        text = " ".join([proc.name(), *proc.cmdline()])
    except Exception:
        return False
    return any(m in text for m in _RAY_MARKERS)


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except Exception:
        return True


def _watch(pid: int) -> None:
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, float] = {}  # pid -> create_time (pids are reused; the time tells them apart)
    while _alive(driver):
        try:
            children = driver.children(recursive=True)
        except Exception:  # a child that ends while the tree is walked; the driver's own end is checked above
            children = []
        for child in children:
            try:
                if child.pid not in seen and _is_ray(child):
                    seen[child.pid] = child.create_time()
            except Exception:
                continue
        time.sleep(_POLL_S)
    left = []
    for cpid, created in seen.items():
        try:
            p = psutil.Process(cpid)
            if abs(p.create_time() - created) < 1e-3:
                left.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in left:  # a chance to exit cleanly first (raylet removes its sockets), then no chance
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=1.5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
