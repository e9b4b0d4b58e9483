"""Deployment files without a cluster: every KubeRay manifest validates against the v1.7.0 CRDs in
``../shared/kuberay`` (unknown keys rejected), entrypoints name files that exist and configs that validate,
each job's config fits its worker groups, and the image's Ray and Python versions match the project's."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
RAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


@pytest.fixture(scope="module")
def crds(shared_data):
    folder = shared_data.parent / "kuberay" / "v1.7.0" / "crds"
    if not folder.exists():
        pytest.fail(f"{folder} is missing")
    out = {}
    for kind, name in RAY_KINDS.items():
        crd = yaml.safe_load((folder / name).read_text())
        out[kind] = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    return out


def _docs():
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield path, i, doc


def _unknown_keys(schema: dict, obj, where: str) -> list[str]:
    """Keys the schema does not declare (the API server would drop them silently: a typo that does nothing)."""
    bad = []
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for k, v in obj.items():
            if k not in schema["properties"]:
                bad.append(f"{where}.{k}")
            else:
                bad += _unknown_keys(schema["properties"][k], v, f"{where}.{k}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in obj.items():
            bad += _unknown_keys(schema["additionalProperties"], v, f"{where}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            bad += _unknown_keys(schema["items"], v, f"{where}[{i}]")
    return bad


def test_manifests_exist():
    kinds = {doc["kind"] for _, _, doc in _docs()}
    assert {"RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding"} <= kinds, kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path, crds):
    for _, i, doc in ((p, i, d) for p, i, d in _docs() if p == path):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}#{i}"
        assert doc["metadata"].get("name"), f"{path.name}#{i}: metadata.name"
        if doc["kind"] not in RAY_KINDS:
            continue
        group, version = doc["apiVersion"].split("/")
        assert group == "ray.io" and version in crds[doc["kind"]], doc["apiVersion"]
        schema = crds[doc["kind"]][version]
        jsonschema.Draft7Validator(schema).validate(doc)
        bad = _unknown_keys(schema, doc, doc["kind"])
        assert not bad, f"{path.name}: keys the CRD does not know: {bad}"


def _job_specs():
    """(manifest, RayJob spec) for every RayJob and every RayCronJob's job template."""
    for path, _, doc in _docs():
        if doc["kind"] == "RayJob":
            yield path, doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield path, doc["spec"]["jobTemplate"]


def _config_of(entrypoint: str) -> tuple[Path, Path]:
    """The repo files behind an entrypoint: the job script and the job config it reads."""
    words = shlex.split(entrypoint)
    script = next(w for w in words if w.endswith(".py"))
    assert script.startswith("/opt/geoseg/"), script  # where the Dockerfile copies the repo's jobs/
    configs = [w for w in words if w.startswith("/etc/geoseg/") and w.endswith(".yaml")]
    assert len(configs) == 1, entrypoint
    return ROOT / script.removeprefix("/opt/geoseg/"), ROOT / "configs" / Path(configs[0]).name


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("path,spec", list(_job_specs()), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_config_fits_the_worker_groups(path, spec):
    """The job's workers x GPUs and CPUs fit the worker groups at their maximum size; when they do not fit at
    the minimum size, the cluster autoscales and the job waits for the workers (runtime.wait_for_resources_s)."""
    from geoseg.config import load_config

    script, config = _config_of(spec["entrypoint"])
    assert script.exists(), script
    assert config.exists(), config
    rt = load_config(config).runtime
    gpus_each = rt.num_gpus_per_worker if rt.num_gpus_per_worker is not None else (1.0 if rt.device == "cuda" else 0)
    need_gpu = rt.workers * gpus_each
    need_cpu = rt.workers * rt.cpus_per_worker + rt.cpus_per_task
    cluster = spec["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]

    def total(key: str, replicas: str) -> float:
        s = 0.0
        for g in groups:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            s += g[replicas] * _quantity(limits.get(key, 0))
        return s

    assert need_gpu <= total("nvidia.com/gpu", "maxReplicas"), (path.name, need_gpu)
    assert need_cpu <= total("cpu", "maxReplicas"), (path.name, need_cpu)
    if need_gpu > total("nvidia.com/gpu", "minReplicas") or need_cpu > total("cpu", "minReplicas"):
        assert cluster.get("enableInTreeAutoscaling"), f"{path.name}: the workers need the autoscaler"
        assert rt.wait_for_resources_s > 0, f"{config.name}: set runtime.wait_for_resources_s"
    for g in groups:  # GPU pods land on tainted GPU nodes only with a toleration
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]:
            tol = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{path.name}: {g['groupName']}"


def test_image_matches_the_project():
    """The Dockerfile's Ray and Python are the ones the project is tested with; manifests use that Ray."""
    import ray
    from packaging.specifiers import SpecifierSet

    text = (ROOT / "infra" / "Dockerfile").read_text()
    m = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", text)
    assert m, "the Dockerfile's base image must be rayproject/ray:<version>-py<python>"
    ray_version, py = m.group(1), f"{m.group(2)}.{m.group(3)}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras, spec = re.search(r'"ray\[([^\]]*)\]([^"]*)"', pyproject).groups()
    assert ray_version in SpecifierSet(spec), (ray_version, spec)
    # data: the pipeline; default: the dashboard and Jobs API that `ray start --head` / `ray job submit` need
    assert {"data", "default"} <= {e.strip() for e in extras.split(",")}, extras
    assert ray_version == ray.__version__, f"the image's Ray {ray_version} vs the tested {ray.__version__}"
    requires = re.search(r'requires-python = "([^"]+)"', pyproject).group(1)
    assert py in SpecifierSet(requires), (py, requires)
    for path, _, doc in _docs():
        spec_ = doc.get("spec", {})
        cluster = spec_.get("rayClusterSpec") or spec_.get("jobTemplate", {}).get("rayClusterSpec")
        if cluster:
            assert cluster["rayVersion"] == ray_version, path.name
    assert "-gpu" in text, "the Dockerfile documents its GPU variant"


# ------------------------------------------------------------------------------- the image's install step


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile: comments dropped, continuation lines joined."""
    steps, current = [], ""
    for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + "\n"
            continue
        word, _, rest = current.strip().partition(" ")
        steps.append((word.upper(), rest.strip()))
        current = ""
    return steps


def _pairs(text: str) -> dict[str, str]:
    """``ARG``/``ENV`` arguments: NAME=value pairs (shell quoting)."""
    return dict(w.split("=", 1) for w in shlex.split(text) if "=" in w)


def _local_cpu_torch(spec: str) -> list[Path]:
    """The CPU wheels of ``spec`` (torch==X) in pip's find-links folders: pip takes them over PyPI's CUDA build."""
    version = spec.split("==", 1)[1]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = [v.strip("'\"") for k, v in (line.split("=", 1) for line in out.splitlines() if "=" in line)
               if k.endswith("find-links")]
    folders += os.environ.get("PIP_FIND_LINKS", "").split()
    return [w for f in folders for w in Path(f).glob(f"torch-{version}+cpu-*.whl")]


@pytest.mark.slow
def test_image_install_step_in_a_fresh_venv(tmp_path):
    """What the image build does, without Docker: a fresh venv of the base image's Python with the base image's
    Ray (rayproject/ray ships ray[default]), the build context laid out by the Dockerfile's COPY lines under its
    WORKDIR, then each RUN command verbatim (sh -c, the ARG defaults in the environment, as docker build runs
    it). The result: the CPU torch wheel (no CUDA build pulled), geoseg installed into the venv (not imported
    from the source tree) with its model weights, and the ``geoseg`` command."""
    steps = _dockerfile()
    args: dict[str, str] = {}
    env_vars: dict[str, str] = {}
    base, workdir, copies, runs = None, None, [], []
    for word, rest in steps:
        if word == "ARG":
            args.update(_pairs(rest) if "=" in rest else {rest: ""})
        elif word == "FROM":
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest)
        elif word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            words = shlex.split(rest)
            assert not [w for w in words if w.startswith("--")], f"COPY flags are not emulated here: {rest}"
            copies.append((words[:-1], words[-1]))
        elif word == "ENV":
            env_vars.update(_pairs(rest))
        elif word == "RUN":
            runs.append(rest)
        else:
            assert word in ("LABEL", "EXPOSE", "USER", "ENTRYPOINT", "CMD"), f"unexpected Dockerfile step {word}"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", base or "")
    assert m, base
    ray_version, python = m.group(1), f"python{m.group(2)}.{m.group(3)}"
    assert workdir and copies and runs
    torch_spec = args.get("TORCH_SPEC", "")
    assert re.fullmatch(r"torch==[\d.]+", torch_spec), torch_spec
    if not _local_cpu_torch(torch_spec):
        msg = f"no CPU wheel for {torch_spec} in pip's find-links: pip would download a CUDA build (GBs)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    interpreter = shutil.which(python)
    assert interpreter, f"{python} (the base image's Python) is not on PATH"

    venv = tmp_path / "venv"
    t0 = time.monotonic()
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, **env_vars, **args, "VIRTUAL_ENV": str(venv),
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    base_ray = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"ray[default]=={ray_version}"],
                              env=env, capture_output=True, text=True, timeout=900)
    assert base_ray.returncode == 0, base_ray.stderr[-3000:]
    t_base = time.monotonic() - t0

    context = tmp_path / "image" / workdir.lstrip("/")  # the WORKDIR, filled as the COPY lines say
    context.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sources, dest in copies:
        target = context / dest
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: not in the repository"
            to = target / path.name if dest.endswith("/") or len(sources) > 1 else target
            if path.is_dir():
                shutil.copytree(path, to, ignore=ignore)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, to)
    t1 = time.monotonic()
    for cmd in runs:
        r = subprocess.run(["sh", "-c", cmd], cwd=context, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"RUN {cmd}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    t_run = time.monotonic() - t1

    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"], env=env,
                            capture_output=True, text=True, check=True).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    assert installed["torch"] == torch_spec.split("==")[1] + "+cpu", installed["torch"]
    assert not [n for n in installed if n.startswith("nvidia-")], "a CUDA torch's libraries were installed"
    assert installed["ray"] == ray_version, installed["ray"]
    probe = ("import geoseg, geoseg.models; m = geoseg.models.load_model('dynamic-world'); "
             "print(geoseg.__file__, m.card.name)")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, name = r.stdout.split()
    assert Path(where).is_relative_to(venv) and name == "dynamic-world", r.stdout
    r = subprocess.run([str(venv / "bin" / "geoseg"), "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert r.returncode == 0 and version in r.stdout, (r.stdout, r.stderr[-2000:])
    print(f"fresh venv: base (python, ray[default]=={ray_version}) {t_base:.0f} s, the image's RUN steps "
          f"{t_run:.0f} s")
