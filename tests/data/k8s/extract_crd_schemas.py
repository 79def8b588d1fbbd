"""Refresh the CRD schemas kept here from upstream CRD files (see README.md).

    python extract_crd_schemas.py JOBSET_OR_KUEUE_CRD.yaml VERSION SOURCE_NOTE > NAME.json

Keeps the group, kind, scope and the ``openAPIV3Schema`` of one served version, without the
``description`` texts (they are most of the size and validate nothing).
"""

from __future__ import annotations

import json
import sys

import yaml


def strip_descriptions(node):
    # a property that is itself called "description" has a schema (a dict) as its value: kept
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(path: str, version: str, source: str) -> None:
    with open(path, encoding="utf-8") as fh:
        crd = next(doc for doc in yaml.safe_load_all(fh) if doc)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    schema = served[version]["schema"]["openAPIV3Schema"]
    out = {
        "source": source,
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": version,
        "scope": crd["spec"]["scope"],
        "openAPIV3Schema": strip_descriptions(schema),
    }
    json.dump(out, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
