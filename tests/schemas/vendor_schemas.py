"""Rebuild the vendored schemas in this folder from their official sources (run by hand; tests only read).

    python tests/schemas/vendor_schemas.py KV_SCHEMA_DIR RAYSERVICES_CRD_YAML

KV_SCHEMA_DIR: `kubernetes_validate/kubernetes-json-schema/v1.37.0-local-strict` from the kubernetes-validate
1.37.0 wheel (PyPI; JSON schemas generated from the Kubernetes v1.37.0 OpenAPI spec, additionalProperties
false). RAYSERVICES_CRD_YAML: `ray-operator/config/crd/bases/ray.io_rayservices.yaml` of ray-project/kuberay
(commit feeaf72facab4881ba2b179248bb67315634e229, after v1.7.0). What changes: only the definitions reachable
from Deployment (apps/v1), Service (v1) and HorizontalPodAutoscaler (autoscaling/v2) are kept, their
"description" texts are dropped and their $refs point into the one file; the RayService CRD keeps its v1
openAPIV3Schema as it is. Validation is unchanged by either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KINDS = {"apps/v1/Deployment": "deployment-apps-v1.json", "v1/Service": "service-v1.json",
         "autoscaling/v2/HorizontalPodAutoscaler": "horizontalpodautoscaler-autoscaling-v2.json"}
REF_PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def _walk(node, refs: set[str]):
    """The node without descriptions and with local $refs; the names it refers to are added to refs."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                name = next(value[len(p):] for p in REF_PREFIXES if value.startswith(p))
                refs.add(name)
                out[key] = "#/$defs/" + name
            else:
                out[key] = _walk(value, refs)
        return out
    if isinstance(node, list):
        return [_walk(value, refs) for value in node]
    return node


def kubernetes(schema_dir: Path) -> dict:
    defs = json.loads((schema_dir / "_definitions.json").read_text())["$defs"]
    refs: set[str] = set()
    kinds = {kind: _walk(json.loads((schema_dir / name).read_text()), refs) for kind, name in KINDS.items()}
    kept, todo = {}, sorted(refs)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        more: set[str] = set()
        kept[name] = _walk(defs[name], more)
        todo += sorted(more - set(kept))
    return {"source": "kubernetes-validate 1.37.0, v1.37.0-local-strict", "kinds": kinds,
            "$defs": dict(sorted(kept.items()))}


def rayservice(crd_yaml: Path) -> dict:
    crd = yaml.safe_load(crd_yaml.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return {"source": "ray-project/kuberay feeaf72f ray-operator/config/crd/bases/ray.io_rayservices.yaml (v1)",
            "schema": version["schema"]["openAPIV3Schema"]}


if __name__ == "__main__":
    (HERE / "kubernetes-v1.37-strict.json").write_text(json.dumps(kubernetes(Path(sys.argv[1])),
                                                                  separators=(",", ":"), sort_keys=True))
    (HERE / "rayservice-v1.json").write_text(json.dumps(rayservice(Path(sys.argv[2])), separators=(",", ":"),
                                                        sort_keys=True))
