"""Write the validation schemas in this folder from KubeRay's CRD files (run by hand when KubeRay is updated).

    python tests/data/kuberay-crds/extract.py <kuberay checkout>/ray-operator/config/crd/bases

For RayCluster, RayJob and RayService it keeps the ``v1`` version's ``openAPIV3Schema`` and drops the
``description`` annotations (documentation only: nothing validates against them), writes compact JSON with a
``$comment`` naming its source, and prints each source file's sha256 for the README.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

KINDS = ("rayclusters", "rayjobs", "rayservices")
HERE = Path(__file__).resolve().parent


def _without_descriptions(node):
    """The schema minus ``description`` keywords; a field named "description" under ``properties`` stays."""
    if isinstance(node, list):
        return [_without_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: _without_descriptions(sub) for name, sub in value.items()}
        else:
            out[key] = _without_descriptions(value)
    return out


def main(bases: Path) -> None:
    for kind in KINDS:
        source = bases / f"ray.io_{kind}.yaml"
        text = source.read_bytes()
        crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = {"$comment": f"KubeRay {source.name}, v1 openAPIV3Schema without descriptions; Apache-2.0, see README.md",
                  **_without_descriptions(version["schema"]["openAPIV3Schema"])}
        (HERE / f"ray.io_{kind}.v1.json").write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{source.name}  sha256 {hashlib.sha256(text).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: extract.py <kuberay>/ray-operator/config/crd/bases")
    main(Path(sys.argv[1]))
