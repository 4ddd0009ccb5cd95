"""The cluster definitions in cluster/ agree with Ray's schemas, with each other and with the code.

Nothing here starts a cloud cluster; instead every file is checked the way its consumer would read
it: the autoscaler YAML against the JSON schema Ray ships, runtime_env.yaml through `ray job submit`'s
own parser and Ray's working_dir packager, the KubeRay manifests against the fields of the ray.io/v1
API, and the entrypoints against the job modules and configs they name. A cluster file that drifts
from the code (a renamed config, a new dependency, a mount path changed in one place only, a grid
whose trials fit on no node) fails here instead of hours into a cluster run.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

from rayjobs.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"

# Fields of the KubeRay ray.io/v1 API (KubeRay 1.x, ray-operator/apis/ray/v1/*_types.go). The API
# server drops unknown fields silently, so a typo (e.g. `shutdownAfterJobFinish`) would just be ignored.
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                   "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "numOfHosts",
                "rayStartParams", "template", "scaleStrategy", "suspend"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy",
                   "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _kind(kind)
    assert len(found) == 1, f"expected exactly one {kind} manifest in {KUBERAY}, found {[str(p) for p, _ in found]}"
    return found[0][1]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec in the manifests, standalone or embedded in a RayJob / RayService."""
    return ([("RayCluster", _one("RayCluster")["spec"]), ("RayJob", _one("RayJob")["spec"]["rayClusterSpec"])]
            + [("RayService", d["spec"]["rayClusterConfig"]) for _, d in _kind("RayService")])


def _pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]


def _shared_claim() -> tuple[str, str]:
    """(claim name, mount path) of the shared results volume, from shared-storage.yaml and the RayCluster."""
    pvc = _one("PersistentVolumeClaim")
    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    vol = next(v for v in head["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"])
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
    return pvc["metadata"]["name"], mount["mountPath"]


def _quantity(v: Any) -> float:
    """Kubernetes CPU / count quantity ("500m", "4", 4) as a number."""
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _runtime_env() -> dict[str, Any]:
    """runtime_env.yaml exactly as `ray job submit --runtime-env ... --working-dir .` builds it."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=".")


def _entrypoint() -> tuple[str, dict[str, str]]:
    """(job module, {--flag: value}) of the RayJob entrypoint."""
    argv = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], f"entrypoint should be `python -m rayjobs.<job> ...`, got {argv}"
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    return argv[2], flags


def _dockerfile() -> tuple[str, str, list[str]]:
    """(base image, WORKDIR, copied top-level paths) of cluster/Dockerfile."""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    copied = [w for line in re.findall(r"^COPY\s+(.*)$", text, re.M)
              for w in shlex.split(line)[:-1] if not w.startswith("--")]
    return base, workdir, copied


def _repo_path(in_image: str) -> Path:
    """A path inside the image (under the Dockerfile's WORKDIR) as a path in this checkout."""
    _, workdir, _ = _dockerfile()
    assert in_image.startswith(workdir.rstrip("/") + "/"), f"{in_image} is not under the image's {workdir}"
    return REPO / in_image[len(workdir.rstrip("/")) + 1:]


def _ray_version_of_image(image: str) -> str:
    m = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
    assert m, f"expected a rayproject/ray:<version>... image, got {image}"
    return m.group(1)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


# -- every file -------------------------------------------------------------------------------------------


def test_every_yaml_parses_and_every_manifest_is_a_ray_io_v1_resource() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"aws-gpu.yaml", "runtime_env.yaml", "raycluster.yaml", "rayjob.yaml",
                                       "shared-storage.yaml"}
    for f in files:
        docs = _docs(f)
        assert docs, f"{f} is empty"
        if f.parent == KUBERAY:
            for d in docs:
                assert d.get("apiVersion") in ("ray.io/v1", "v1") and d.get("kind") and d["metadata"].get("name"), f
                if d["apiVersion"] == "ray.io/v1":
                    assert d["kind"] in ("RayCluster", "RayJob", "RayService"), f


def test_kuberay_manifests_use_only_fields_of_the_api() -> None:
    def check(where: str, obj: dict[str, Any], known: set[str]) -> None:
        unknown = set(obj) - known
        assert not unknown, f"{where}: fields not in the KubeRay API: {sorted(unknown)}"

    check("RayJob.spec", _one("RayJob")["spec"], RAYJOB_SPEC)
    for _, d in _kind("RayService"):
        check("RayService.spec", d["spec"], RAYSERVICE_SPEC)
    for where, spec in _cluster_specs():
        check(f"{where} cluster spec", spec, RAYCLUSTER_SPEC)
        check(f"{where} headGroupSpec", spec["headGroupSpec"], HEAD_GROUP)
        check(f"{where} autoscalerOptions", spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS)
        for g in spec.get("workerGroupSpecs", []):
            check(f"{where} worker group {g.get('groupName')}", g, WORKER_GROUP)
            assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        # KubeRay passes rayStartParams to `ray start` as strings; YAML numbers/bools are rejected.
        for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec.get("workerGroupSpecs", [])]:
            assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"


# -- the Ray versions -------------------------------------------------------------------------------------


def test_one_ray_version_across_image_manifests_and_autoscaler() -> None:
    base, _, _ = _dockerfile()
    version = _ray_version_of_image(base)
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == version, f"{where}: rayVersion {spec['rayVersion']} != Dockerfile's {version}"
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert _ray_version_of_image(aws["docker"]["image"]) == version
    floor = next(d for d in _pyproject()["project"]["dependencies"] if _req_name(d) == "ray")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, floor.split(">=")[1].split("."))), floor


def test_image_holds_every_package_of_the_distribution() -> None:
    _, _, copied = _dockerfile()
    # package discovery: the top-level folders its include patterns name (subpackages come with them)
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.rstrip("*").split(".")[0] for p in include})
    assert packages == ["analysis", "rayjobs", "serving"]
    missing = [p for p in packages if p not in copied]
    assert not missing, f"cluster/Dockerfile does not COPY {missing}: `pip install -e .` in the image would fail"
    assert "pyproject.toml" in copied
    assert "configs" in copied, "the RayJob entrypoint reads its config from the image"


# -- runtime_env.yaml -------------------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray_job_submit() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"


def test_runtime_env_installs_nothing_and_names_no_site_paths() -> None:
    """Nodes already hold the dependencies (a per-job `pip` list makes Ray copy the node's whole venv
    for every job), and a path of one site (`/mnt/...`) breaks the job on every other machine."""
    env = _runtime_env()
    assert not {"pip", "conda", "uv", "py_executable"} & set(env), sorted(env)
    site = {k: v for k, v in env["env_vars"].items() if v.startswith(("/", "~"))}
    assert not site, f"runtime_env.yaml names paths of one site: {site}"


def test_runtime_env_upload_leaves_out_venv_and_results(tmp_path: Path) -> None:
    """Zip a checkout-like tree with Ray's working_dir packager and the file's excludes (no .gitignore
    help: a copied or exported tree has none) and look at what would be uploaded."""
    # the packager `ray job submit --working-dir` runs (private API: if it moves, follow it)
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "repo"
    for rel in ["rayjobs/pairwise.py", "rayjobs/tasks/registry.yaml", "configs/quickstart.yaml", "analysis/store/results.py",
                ".venv/lib/python3.11/site-packages/torch/__init__.py", ".venv/bin/python",
                "results/quickstart/transferlab.duckdb", "results/quickstart/checkpoints/k/model.safetensors",
                "results/quickstart/runs/k.parquet", "rayjobs/__pycache__/pairwise.cpython-311.pyc",
                ".git/objects/ab/cdef", "sub/results/x.parquet"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=False, excludes=_runtime_env()["excludes"])
    names = set(zipfile.ZipFile(pkg).namelist())
    assert {"rayjobs/pairwise.py", "rayjobs/tasks/registry.yaml", "configs/quickstart.yaml", "analysis/store/results.py"} <= names
    leaked = sorted(n for n in names if n.startswith((".venv/", ".git/")) or "results/" in n or "__pycache__" in n)
    assert not leaked, f"would upload: {leaked}"


# -- the autoscaler YAML ----------------------------------------------------------------------------------


def test_autoscaler_yaml_validates_against_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "trials must not land on the head"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values()), \
        "every worker type of the GPU cluster advertises its GPUs"
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= cfg["max_workers"]


def test_autoscaler_shares_one_results_path_and_installs_the_deepspeed_extra() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    shared = _shared_claim()[1]
    # host mount (initialization_commands) -> same path in the container (docker -v) on every node
    assert any(f" {shared}" in c and "mount" in c for c in cfg["initialization_commands"])
    binds = [o.split()[1] for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    assert f"{shared}:{shared}" in binds
    # the nodes' environment (not the job's runtime_env) points data and model cache into it
    docker_env = dict(o.split()[1].split("=", 1) for o in cfg["docker"]["run_options"] if o.startswith("-e "))
    for var in ("TRANSFERLAB_DATA", "HF_HOME"):
        assert docker_env[var].startswith(shared + "/"), var
        for where, spec in _cluster_specs()[:2]:
            for group, tpl in _pod_templates(spec):
                env = {e["name"]: e.get("value") for e in tpl["spec"]["containers"][0].get("env", [])}
                assert env.get(var, "").startswith(shared + "/"), f"{where}/{group} lacks {var}"
    # the repository is synced to one path and installed from there, with the deepspeed extra
    (remote, local), = ((r, lo) for r, lo in cfg["file_mounts"].items() if lo == ".")
    assert local == "."
    assert any("pip install" in c and remote in c and "deepspeed" in c for c in cfg["setup_commands"])
    for pattern in ("**/.venv", "**/results"):
        assert pattern in cfg["rsync_exclude"]


# -- token auth and permissions ---------------------------------------------------------------------------


AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}


def test_every_kuberay_cluster_requires_token_auth_from_one_secret() -> None:
    secrets = set()
    for where, spec in _cluster_specs():
        auth = spec.get("authOptions")
        assert auth and auth.get("mode") == "token", f"{where}: no token auth for the dashboard and jobs API"
        assert set(auth) <= AUTH_OPTIONS, f"{where}: authOptions fields not in the KubeRay API: {set(auth) - AUTH_OPTIONS}"
        secrets.add(auth.get("secretName"))
    assert len(secrets) == 1 and None not in secrets, f"one Secret for every cluster, found {secrets}"
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {secrets.pop()} --from-literal=auth_token=" in readme


def test_autoscaler_nodes_start_ray_with_token_auth_and_the_token() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(re.search(r"export RAY_AUTH_MODE=token;.*ray start", c) for c in starts), key
    # the token of the machine running `ray up` lands where Ray reads it in the container ($HOME/.ray)
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"


def test_nothing_in_cluster_makes_a_folder_world_writable() -> None:
    """No chmod / install mode with the other-write bit, symbolic or octal, in any cluster file."""
    for f in sorted(CLUSTER.rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text()
        assert not re.search(r"chmod\s+(-\w+\s+)*[ugo]*[ao][ugo]*\+[rx]*w", text), f"{f}: symbolic world-write"
        for mode in re.findall(r"(?:chmod\s+(?:-\w+\s+)*|install\s[^\n]*-m\s+)([0-7]{3,4})\b", text):
            assert int(mode, 8) & 0o002 == 0, f"{f}: mode {mode} is world-writable"


# -- KubeRay: RayCluster / RayJob / RayService ------------------------------------------------------------


def test_rayjob_creates_the_same_cluster_as_raycluster_yaml() -> None:
    assert _one("RayJob")["spec"]["rayClusterSpec"] == _one("RayCluster")["spec"]


def test_every_pod_mounts_the_shared_volume_at_one_path() -> None:
    claim, mount_path = _shared_claim()
    pvc = _one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "pods on different nodes write results concurrently"
    for where, spec in _cluster_specs():
        for group, tpl in _pod_templates(spec):
            vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
            shared = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
            assert len(shared) == 1, f"{where}/{group} does not mount {claim}"
            mounts = {m["name"]: m["mountPath"] for m in tpl["spec"]["containers"][0]["volumeMounts"]}
            assert mounts.get(shared[0]) == mount_path, f"{where}/{group} mounts {claim} elsewhere"


def test_kuberay_worker_groups_have_gpus_and_the_head_runs_no_trials() -> None:
    for where, spec in _cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", where
        images = {c["image"] for _, tpl in _pod_templates(spec) for c in tpl["spec"]["containers"]}
        assert len(images) == 1, f"{where}: head and workers must run one image, got {images}"
        for group, tpl in _pod_templates(spec)[1:]:
            limits = tpl["spec"]["containers"][0]["resources"]["limits"]
            assert _quantity(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}/{group} has no GPU"


def test_rayjob_entrypoint_names_a_real_job_and_config() -> None:
    module, flags = _entrypoint()
    assert module.startswith("rayjobs.") and (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    # the job accepts exactly these flags (ask its own argument parser)
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120, check=True).stdout
    for flag in flags:
        assert flag in help_text, f"{module} has no {flag} option"
    config = _repo_path(flags["--config"])
    assert config.parent == REPO / "configs" and config.is_file(), config
    load_config(config)  # a config error would only surface once the cluster is up
    assert flags["--results"].startswith(_shared_claim()[1] + "/"), "results must go to the shared volume"


def test_rayjob_trials_fit_on_a_worker_of_each_gpu_cluster() -> None:
    """Every setup of the RayJob's config must fit on some worker group (KubeRay) and node type
    (autoscaler): otherwise its trials stay pending forever while the autoscaler finds nothing to add."""
    cfg = load_config(_repo_path(_entrypoint()[1]["--config"]))
    k8s = [(_quantity(lim.get("cpu", 0)), _quantity(lim.get("nvidia.com/gpu", 0)))
           for _, tpl in _pod_templates(_one("RayJob")["spec"]["rayClusterSpec"])[1:]
           for lim in [tpl["spec"]["containers"][0]["resources"]["limits"]]]
    aws_cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    aws = [(float(t["resources"].get("CPU", 0)), float(t["resources"].get("GPU", 0)))
           for name, t in aws_cfg["available_node_types"].items() if name != aws_cfg["head_node_type"]]
    for setup in cfg.setups:
        r = setup.resources
        for where, nodes in (("KubeRay worker groups", k8s), ("aws-gpu.yaml node types", aws)):
            assert any(cpu >= r.cpu and gpu >= r.gpu for cpu, gpu in nodes), \
                f"setup {setup.key} (cpu={r.cpu}, gpu={r.gpu}) fits on none of the {where} {nodes}"


def test_rayjob_runtime_env_matches_runtime_env_yaml() -> None:
    job_env = yaml.safe_load(_one("RayJob")["spec"]["runtimeEnvYAML"])
    assert job_env["env_vars"] == _runtime_env()["env_vars"]
    assert "working_dir" not in job_env, "the RayJob runs the code baked into the image"


def test_rayservice_deploys_the_serve_application_of_serving_config_yaml() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.settings import ServeSettings

    (path, doc), = _kind("RayService")
    assert path.name == "rayservice.yaml" and "transferlab/status" not in doc["metadata"].get("annotations", {})
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))  # Serve's own schema
    local = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serving" / "config.yaml").read_text()))
    for app in config.applications:
        assert app.import_path == local.applications[0].import_path
        module, attr = app.import_path.split(":")
        tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
        assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{module} has no {attr}()"
        settings = ServeSettings.model_validate(app.args)  # every arg is a setting of the application
        shared = _shared_claim()[1]
        assert settings.db and settings.db.startswith(shared + "/") and settings.results.startswith(shared + "/")
        # the scorer's resources fit on a worker of the service's cluster
        spec = doc["spec"]["rayClusterConfig"]
        nodes = [(_quantity(t["spec"]["containers"][0]["resources"]["limits"].get("cpu", 0)),
                  _quantity(t["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)))
                 for _, t in _pod_templates(spec)[1:]]
        scorer = next(d for d in app.deployments if d.name == "Scorer").ray_actor_options  # the deployments: section
        assert any(c >= scorer.num_cpus and g >= scorer.num_gpus for c, g in nodes), nodes
    # the ingress checks TRANSFERLAB_API_TOKEN in whichever pod it lands: every pod gets it from the secret
    for group, tpl in _pod_templates(doc["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in tpl["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env["TRANSFERLAB_API_TOKEN"]["valueFrom"], group
    assert "rayservice.yaml" in (CLUSTER / "README.md").read_text()
