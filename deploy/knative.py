"""Finish ``faas-cli generate --api=serving.knative.dev/v1`` output for Knative Serving (docs/knative.md).

Usage (repository root, after ``make setup``)::

    faas-cli generate --api=serving.knative.dev/v1 -f stack.yml --regex '^edge-' \\
      | .venv/bin/python deploy/knative.py --stack stack.yml | kubectl apply -f -

Why a step after ``generate`` (checked in faas-cli's source, commands/generate.go,
``generateknativev1ServingServiceCRDYAML``): it drops the function's ``labels``, so the
``com.openfaas.scale.*`` labels never reach Knative, and it copies the function's
``annotations`` to the Service's top-level ``metadata.annotations``, where Knative's webhook
rejects autoscaling annotations ("autoscaling annotations must be put under
spec.template.metadata.annotations to work"). So stack.yml keeps the OpenFaaS labels as the one
source of truth and this filter writes, per Service:

- ``spec.template.metadata.annotations``: ``autoscaling.knative.dev/min-scale`` and ``max-scale``
  from ``com.openfaas.scale.min``/``max``; ``metric``/``target`` from ``com.openfaas.scale.type``
  (``rps`` → ``rps``, ``capacity`` → ``concurrency``, ``cpu`` → the HPA class) and
  ``com.openfaas.scale.target``. Autoscaling annotations found on the top-level metadata are moved
  there too.
- ``spec.template.metadata.labels``: ``faas_function: <name>``, the label OpenFaaS gives its pods,
  which the zones' NetworkPolicies (deploy/k8s/*/networkpolicies.yaml) admit to Redis and the broker.
- the port: Knative sends traffic to the container port and tells the container through ``PORT``
  (8080 unless a port is declared); of-watchdog listens on ``port`` (lower case, default 8080).
  The container gets ``ports: [{containerPort: 8080}]`` and ``port=8080`` so both agree explicitly.

Standard library plus PyYAML (a dependency of the repository's tools).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: gateway.stack reads stack.yml as faas-cli does
    sys.path.insert(0, str(ROOT))

from gateway.stack import load_stack  # noqa: E402

AUTOSCALING = "autoscaling.knative.dev/"
#: The watchdog's port; Knative's default container port is the same.
WATCHDOG_PORT = 8080
#: OpenFaaS scale type → (Knative metric, Knative autoscaler class or None for the default KPA).
METRICS: dict[str, tuple[str, str | None]] = {
    "rps": ("rps", None),
    "capacity": ("concurrency", None),
    "cpu": ("cpu", "hpa.autoscaling.knative.dev"),
}


def autoscaling_annotations(labels: Mapping[str, str]) -> dict[str, str]:
    """Knative revision annotations equivalent to a function's ``com.openfaas.scale.*`` labels."""
    out: dict[str, str] = {}
    if "com.openfaas.scale.min" in labels:
        out[AUTOSCALING + "min-scale"] = str(int(labels["com.openfaas.scale.min"]))
    if "com.openfaas.scale.max" in labels:
        out[AUTOSCALING + "max-scale"] = str(int(labels["com.openfaas.scale.max"]))
    kind = labels.get("com.openfaas.scale.type")
    if kind is not None:
        if kind not in METRICS:
            raise ValueError(f"com.openfaas.scale.type {kind!r} has no Knative metric; known: {sorted(METRICS)}")
        metric, klass = METRICS[kind]
        out[AUTOSCALING + "metric"] = metric
        if klass:
            out[AUTOSCALING + "class"] = klass
    if "com.openfaas.scale.target" in labels:
        out[AUTOSCALING + "target"] = str(int(labels["com.openfaas.scale.target"]))
    return out


def finish_service(doc: dict[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """One generated Knative Service with its scale annotations and port in place (changed in place)."""
    meta = doc.setdefault("metadata", {})
    top = meta.get("annotations") or {}
    moved = {k: v for k, v in top.items() if k.startswith(AUTOSCALING)}
    kept = {k: v for k, v in top.items() if not k.startswith(AUTOSCALING)}
    if kept:
        meta["annotations"] = kept
    else:
        meta.pop("annotations", None)
    template = doc.setdefault("spec", {}).setdefault("template", {})
    template_meta = template.setdefault("metadata", {})
    template_meta["annotations"] = {**(template_meta.get("annotations") or {}), **moved,
                                    **autoscaling_annotations(labels)}
    template_meta["labels"] = {**(template_meta.get("labels") or {}), "faas_function": meta["name"]}
    for container in template.setdefault("spec", {}).get("containers") or []:
        container["ports"] = [{"containerPort": WATCHDOG_PORT}]
        env = [e for e in container.get("env") or [] if e.get("name") != "port"]
        container["env"] = [*env, {"name": "port", "value": str(WATCHDOG_PORT)}]
    return doc


def finish(documents: Iterable[Any], stack: Path) -> list[dict[str, Any]]:
    """Every Knative Service of ``documents``, finished with the labels of the same function in ``stack``."""
    functions = load_stack(stack).functions
    out = []
    for doc in documents:
        if not doc:
            continue
        if doc.get("kind") == "Service" and str(doc.get("apiVersion", "")).startswith("serving.knative.dev/"):
            name = doc["metadata"]["name"]
            if name not in functions:
                raise ValueError(f"Service {name!r} is not a function of {stack}")
            finish_service(doc, functions[name].labels)
        out.append(doc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stack", type=Path, default=ROOT / "stack.yml", help="the stack.yml given to faas-cli")
    parser.add_argument("input", nargs="?", type=Path, help="generated YAML (default: standard input)")
    args = parser.parse_args(argv)
    text = args.input.read_text() if args.input else sys.stdin.read()
    docs = finish(yaml.safe_load_all(text), args.stack)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
