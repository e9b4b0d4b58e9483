"""Deployment files without a cluster: every KubeRay manifest validates against the v1.7.0 CRDs in
``../shared/kuberay`` (unknown keys rejected), entrypoints name files that exist and configs that validate,
each job's config fits its worker groups, and the image's Ray and Python versions match the project's."""

from __future__ import annotations

import re
import shlex
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
    spec = re.search(r'"ray\[data\]([^"]*)"', pyproject).group(1)
    assert ray_version in SpecifierSet(spec), (ray_version, spec)
    assert ray_version == ray.__version__, f"the image's Ray {ray_version} vs the tested {ray.__version__}"
    requires = re.search(r'requires-python = "([^"]+)"', pyproject).group(1)
    assert py in SpecifierSet(requires), (py, requires)
    for path, _, doc in _docs():
        spec_ = doc.get("spec", {})
        cluster = spec_.get("rayClusterSpec") or spec_.get("jobTemplate", {}).get("rayClusterSpec")
        if cluster:
            assert cluster["rayVersion"] == ray_version, path.name
    assert "-gpu" in text, "the Dockerfile documents its GPU variant"
