"""Every YAML under ``infra/`` validates against KubeRay's CRD schemas, strictly (an unknown field fails, as with
``kubectl apply --validate=strict``), and the cluster image installs what ``ray job submit`` talks to.

The CRDs are fixtures: ``$STYLID_KUBERAY_CRDS``, default ``<repo>/../shared/kuberay-crds`` (KubeRay's
``ray.io_rayjobs.yaml``, ``ray.io_raycronjobs.yaml``, ``ray.io_rayclusters.yaml``)."""

from __future__ import annotations

import copy
import glob
import os
import re

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRD_DIR = os.environ.get("STYLID_KUBERAY_CRDS", os.path.join(REPO, "..", "shared", "kuberay-crds"))
MANIFESTS = sorted(glob.glob(os.path.join(REPO, "infra", "**", "*.yaml"), recursive=True)
                   + glob.glob(os.path.join(REPO, "infra", "**", "*.yml"), recursive=True))  # fmt: skip

needs_crds = pytest.mark.skipif(
    not glob.glob(os.path.join(CRD_DIR, "*.yaml")), reason=f"KubeRay CRDs not found in {CRD_DIR} (STYLID_KUBERAY_CRDS)"
)


def to_json_schema(node: object) -> object:
    """An OpenAPI v3 CRD schema as JSON Schema: Kubernetes' extensions mapped to what they mean.

    - ``x-kubernetes-int-or-string``: an integer or a string (where the CRD does not spell out the ``anyOf``);
    - ``nullable``: null allowed too;
    - ``x-kubernetes-preserve-unknown-fields``: any further field;
    - otherwise an object with ``properties`` accepts no other field (strict validation: Kubernetes would drop it
      silently, which is how a misnamed field goes unnoticed).
    ``x-kubernetes-list-type``/``-map-type``/``-list-map-keys`` only describe merges, and the CEL rules of
    ``x-kubernetes-validations`` need a Kubernetes API server: both are left out.
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    elif "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def load_crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON Schema of that custom resource, for every served version of every CRD."""
    schemas = {}
    for path in sorted(glob.glob(os.path.join(CRD_DIR, "*.yaml"))):
        with open(path) as f:
            for crd in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # 3 MB of YAML
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served", True):
                        schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                        schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict]:
    return load_crd_schemas()


def documents(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def problems(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    """Each schema violation of ``doc`` as 'path: message' (empty when it validates)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"no KubeRay CRD for apiVersion {key[0]!r} kind {key[1]!r} (known: {sorted(schemas)})"]
    validator = jsonschema.Draft7Validator(schemas[key])
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def test_infra_has_manifests():
    assert MANIFESTS, "no YAML under infra/"


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=[os.path.relpath(p, REPO) for p in MANIFESTS])
def test_every_manifest_validates_against_the_kuberay_crds(path, schemas):
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for k, doc in enumerate(docs):
        found = problems(doc, schemas)
        assert not found, f"{os.path.relpath(path, REPO)} document {k} ({doc.get('kind')}):\n" + "\n".join(found)


def _by_kind() -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for path in MANIFESTS:
        for doc in documents(path):
            kinds.setdefault(doc.get("kind"), []).append(doc)
    return kinds


def _gpus(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def test_there_is_a_rayjob_a_raycronjob_and_a_raycluster_with_a_cpu_and_a_gpu_group():
    kinds = _by_kind()
    for kind in ("RayJob", "RayCronJob", "RayCluster"):
        assert kinds.get(kind), f"no {kind} manifest under infra/"
    for cluster in kinds["RayCluster"]:
        groups = cluster["spec"]["workerGroupSpecs"]
        names = [g["groupName"] for g in groups]
        assert any(_gpus(g) == 0 for g in groups) and any(_gpus(g) > 0 for g in groups), names
    for job in kinds["RayJob"] + [c["spec"]["jobTemplate"] for c in kinds["RayCronJob"]]:
        spec = job.get("spec", job)
        assert re.search(r"\bstylid (run|score|customize)\b", spec["entrypoint"]), spec["entrypoint"]


@needs_crds
def test_the_strict_validator_catches_what_kubernetes_would_drop(schemas):
    """Not vacuous: the RayCronJob shape that was in infra/ before (``rayJobTemplate``), a misspelled field deep in a
    pod template, a wrong type and an int-or-string given as a list all fail; a quantity as a number passes."""
    cron = copy.deepcopy(_by_kind()["RayCronJob"][0])
    cron["spec"]["rayJobTemplate"] = cron["spec"].pop("jobTemplate")
    found = problems(cron, schemas)
    assert any("'jobTemplate' is a required property" in p for p in found), found
    assert any("rayJobTemplate" in p for p in found), found

    job = copy.deepcopy(_by_kind()["RayJob"][0])
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in p for p in problems(job, schemas))
    job = copy.deepcopy(_by_kind()["RayJob"][0])
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any(p.startswith("spec/shutdownAfterJobFinishes") for p in problems(job, schemas))
    job = copy.deepcopy(_by_kind()["RayJob"][0])
    limits = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    limits["limits"]["cpu"] = 16  # a quantity may be an integer
    assert problems(job, schemas) == []
    limits["limits"]["cpu"] = ["16"]
    assert any("cpu" in p for p in problems(job, schemas))


def test_the_image_installs_the_project_with_the_jobs_api_dependencies():
    """``ray job submit`` talks to the dashboard's Jobs API on the head: it needs ``ray[default]``, which the
    project's dependencies carry and the Dockerfile installs with the project (not ``--no-deps``)."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        pyproject = f.read()
    ray_dep = re.search(r'"ray\[([^\]]*)\][^"]*"', pyproject)
    assert ray_dep and "default" in ray_dep.group(1).split(","), "ray[default] is not a dependency"
    with open(os.path.join(REPO, "infra", "Dockerfile")) as f:
        docker = f.read()
    project_install = r"pip install\b.*\s(-e\s+)?\.(\s|$)"
    installs = [line for line in docker.splitlines() if re.search(project_install, line)]
    assert installs and not any("--no-deps" in line for line in installs), installs
    assert re.search(r"dashboard|8265", docker), "the image does not say how the Jobs API is reached"


def _model_paths(config) -> list[tuple[str, str]]:
    """(setting, value) of every model location a job config names."""
    found = [("faces.model_dir", config.faces.model_dir), ("faces.root", config.faces.root)]
    options = config.stylize.options if hasattr(config, "stylize") else {}
    found += [(f"stylize.options.{k}", v) for k, v in options.items() if k in ("model", "vae")]
    return [(k, v) for k, v in found if v]


def _mounts(group: dict) -> list[str]:
    return [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]


def test_every_worker_group_of_a_job_mounts_the_models_its_config_names():
    """Issue "Nightly scoring" item 8: the one-off RayJob's config named ``model_dir: buffalo_l`` and a hub id
    under ``HF_HUB_OFFLINE=1``, with ``/models`` mounted on the GPU group only, while insightface runs on the CPU
    workers. Every model a job's config names is an absolute path under a folder mounted on every worker group
    (a stage can land on any of them), and with the hub offline none is a hub id."""
    from jobs.config import load_job_config, load_score_config

    loaders = {"run": lambda path: load_job_config(path, []), "score": lambda path: load_score_config(path)[0]}

    jobs = [(doc, doc["spec"]) for doc in _by_kind()["RayJob"]]
    jobs += [(doc, doc["spec"]["jobTemplate"]) for doc in _by_kind()["RayCronJob"]]
    checked = 0
    for doc, spec in jobs:
        offline = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}").get("env_vars", {}).get("HF_HUB_OFFLINE")
        groups = spec["rayClusterSpec"]["workerGroupSpecs"]
        for command, name in re.findall(r"stylid (run|score) --config\s+(\S+)", spec["entrypoint"]):
            config = loaders[command](os.path.join(REPO, name))
            for setting, value in _model_paths(config):
                where = f"{doc['metadata']['name']}: {name} {setting}={value}"
                assert os.path.isabs(value), f"{where}: not a path on the workers (a hub id or a bare name)"
                assert offline == "1", f"{where}: models from disk, so the hub should be offline"
                for group in groups:
                    assert any(value.startswith(m.rstrip("/") + "/") for m in _mounts(group)), (
                        f"{where}: worker group {group['groupName']} does not mount it")  # fmt: skip
                checked += 1
    assert checked >= 2  # not vacuous: stylize_sd15's insightface folder and Stable Diffusion folder
