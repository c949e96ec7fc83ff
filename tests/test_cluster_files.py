"""Cluster files of a run: each Kubernetes object checked against the official schema (vendored in
tests/schemas/, see its README), the Serve config against Ray's own schema, and a broken manifest rejected."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import jsonschema
import pytest
import yaml

from workbench.config import Config
from workbench.deploy.cluster import cluster_files, write_cluster_files
from workbench.errors import WorkbenchError
from workbench.store import RunStore

SCHEMAS = Path(__file__).parent / "schemas"


def _strict(node):
    """A CRD schema as `kubectl apply --validate=strict` reads it: unknown fields are errors."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.protocols.Validator]:
    kube = json.loads((SCHEMAS / "kubernetes-v1.37-strict.json").read_text())
    out = {kind: jsonschema.Draft202012Validator({**schema, "$defs": kube["$defs"]})
           for kind, schema in kube["kinds"].items()}
    ray_service = json.loads((SCHEMAS / "rayservice-v1.json").read_text())["schema"]
    out["ray.io/v1/RayService"] = jsonschema.Draft7Validator(_strict(ray_service))
    return out


def _check(validators, document: dict) -> None:
    validators[f"{document['apiVersion']}/{document['kind']}"].validate(document)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return cluster_files("20261203-180717-6051", image="registry.example/wb:1", min_replicas=1, max_replicas=3,
                         target_ongoing_requests=2.0, replica_cpus=0.5, upscale_delay_s=10, downscale_delay_s=60)


def test_kubernetes_objects_match_the_official_schemas(validators, files):
    documents = list(yaml.safe_load_all(files["kubernetes.yaml"]))
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for document in documents:
        _check(validators, document)
    hpa = documents[2]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)
    metric = hpa["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "workbench_in_flight_requests"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3000m"}  # 2 + the scrape itself
    container = documents[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/wb:1"
    assert "Bearer" not in json.dumps(documents[0]).replace("'Bearer ' + key", "")  # no key in the spec


def test_the_metric_the_hpa_reads_is_the_servers(files):
    """The HPA's metric is the gauge the server's /metrics writes (monitor.ServerMetrics)."""
    from prometheus_client import generate_latest

    from workbench.deploy.monitor import ServerMetrics

    hpa = list(yaml.safe_load_all(files["kubernetes.yaml"]))[2]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    metrics = ServerMetrics()
    assert f"\n{name} " in "\n" + generate_latest(metrics.registry).decode()


def test_rayservice_matches_the_kuberay_crd_and_rays_serve_schema(validators, files):
    from ray.serve.schema import ServeDeploySchema

    (service,) = yaml.safe_load_all(files["rayservice.yaml"])
    _check(validators, service)
    config = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))  # Ray's own validation
    (application,) = config.applications
    assert application.import_path == "workbench.deploy.ray_engine:build_app"
    (deployment,) = application.deployments
    scaling = deployment.autoscaling_config
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 3, 2.0)
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (10, 60)
    assert deployment.ray_actor_options.num_cpus == 0.5
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] >= 1 and service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type", "missing required"])
def test_a_broken_manifest_is_rejected(validators, files, breakage):
    deployment, _, hpa = yaml.safe_load_all(files["kubernetes.yaml"])
    (service,) = yaml.safe_load_all(files["rayservice.yaml"])
    broken = [copy.deepcopy(d) for d in (deployment, hpa, service)]
    if breakage == "unknown field":
        broken[0]["spec"]["replica"] = 2                                # a typo of replicas
        broken[1]["spec"]["metrics"][0]["pods"]["targets"] = {}         # a typo of target
        broken[2]["spec"]["rayClusterConfig"]["workerGroupSpec"] = []   # a typo of workerGroupSpecs
    elif breakage == "wrong type":
        broken[0]["spec"]["replicas"] = "two"
        broken[1]["spec"]["maxReplicas"] = "3"
        broken[2]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "3"
    else:
        del broken[0]["spec"]["selector"]
        del broken[1]["spec"]["scaleTargetRef"]
        del broken[2]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    for document in broken:
        with pytest.raises(jsonschema.ValidationError):
            _check(validators, document)


def test_bad_scaling_is_refused():
    with pytest.raises(WorkbenchError, match="min_replicas=5 is more than max_replicas=2"):
        cluster_files("r", min_replicas=5, max_replicas=2)


def test_dockerfile_installs_the_serve_extra_and_holds_the_run(files):
    text = files["Dockerfile"]
    assert "FROM rayproject/ray:" in text and '"llm-workbench[serve,cluster]"' in text
    assert "download.pytorch.org/whl/cpu" in text  # not the CUDA torch
    assert "COPY --chown=1000:100 home/ /home/ray/workbench/" in text
    assert '"serve", "20261203-180717-6051"' in text


def test_write_cluster_files_stages_a_one_run_workspace(tmp_path, tiny_model_dir, tiny_csv):
    import workbench

    home = tmp_path / "home"
    raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 16, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": False}}
    store = RunStore(home)
    kept = workbench.train(Config.from_dict(raw), store=store)["id"]
    other = store.create_run(Config.from_dict(raw).to_dict())  # a second run, which must stay out
    out = tmp_path / "cluster"
    paths = write_cluster_files(out, kept, home, image="wb:1")
    assert sorted(paths) == ["Dockerfile", "README.md", "kubernetes.yaml", "rayservice.yaml"]
    with sqlite3.connect(out / "home" / "runs.sqlite") as db:
        assert [row[0] for row in db.execute("SELECT id FROM runs")] == [kept]
        assert {row[0] for row in db.execute("SELECT DISTINCT run_id FROM points")} <= {kept}
    assert RunStore(out / "home").get(kept)["status"] == "completed"
    assert not (out / "home" / "runs" / other).exists()
    # the base model is a local folder here: copied into the context, put back at its path in the image
    assert (out / "base-model" / "config.json").is_file()
    assert f"base-model/ {Path(tiny_model_dir).resolve()}/" in Path(paths["Dockerfile"]).read_text()
    with pytest.raises(WorkbenchError, match="is not empty"):
        write_cluster_files(out, kept, home)

    from workbench.cli import main  # the same through the CLI; a non-empty folder is exit code 2

    cli_out = tmp_path / "cli-cluster"
    assert main(["--home", str(home), "cluster-files", kept, "--out", str(cli_out), "--image", "wb:2",
                 "--max-replicas", "3"]) == 0
    assert "image: wb:2" in (cli_out / "kubernetes.yaml").read_text()
    assert "maxReplicas: 3" in (cli_out / "kubernetes.yaml").read_text()
    assert main(["--home", str(home), "cluster-files", kept, "--out", str(cli_out)]) == 2


def test_serve_engine_options_become_rays_autoscaling():
    from workbench.cli import _parser, ray_scaling

    args = _parser().parse_args(["serve", "r", "--engine", "ray", "--min-replicas", "1", "--max-replicas", "4",
                                 "--target-ongoing", "3", "--replica-cpus", "0.25"])
    scaling = ray_scaling(args)
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests, scaling.replica_cpus) == (
        1, 4, 3.0, 0.25)
    assert _parser().parse_args(["serve", "r"]).engine == "auto"  # vLLM for a chat run on a GPU, else uvicorn
    with pytest.raises(WorkbenchError, match="give --min-replicas"):
        ray_scaling(_parser().parse_args(["serve", "r", "--engine", "ray", "--min-replicas", "3"]))
