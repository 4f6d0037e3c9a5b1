"""``pacs-triage models``: what is installed, one model in detail, and checking a bundle.

``pacs-triage models list`` shows every installed model (shipped bundles, the
configured ``models_dirs`` and ``<data_dir>/models``) and every bundle that
was skipped, with the reason. ``pacs-triage models show NAME [--version V]``
shows one model: identity, weights hash, mode, selection rule, input,
findings and its evaluation numbers. ``pacs-triage models validate PATH``
checks a bundle before it goes live (layout, triage section, loads the network
and runs a dummy input of the declared shape) and exits 1 with the reason when
it is not valid. ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from archive.config import Settings


def register(subparsers: Any) -> None:
    """Add the ``models`` command to the ``pacs-triage`` parser's subparsers."""
    models = subparsers.add_parser("models", help="list, show and validate model bundles")
    commands = models.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="installed models and skipped bundles")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = commands.add_parser("show", help="one installed model in detail")
    show.add_argument("name")
    show.add_argument("--version", default=None, help="default: the active version")
    show.add_argument("--json", action="store_true", help="print JSON")
    validate = commands.add_parser("validate", help="check a bundle before it goes live")
    validate.add_argument("path", type=Path)
    validate.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run ``pacs-triage models <list|show|validate>``; return the exit status."""
    from models.registry import (
        BundleValidationError,
        ModelNotFoundError,
        ModelRegistry,
        configure_inference,
        default_model_directories,
        validate_bundle,
    )

    settings = Settings()
    device = configure_inference(settings)
    if args.models_command == "validate":
        try:
            model = validate_bundle(args.path, device=device)
        except BundleValidationError as exc:
            if args.json:
                print(json.dumps({"valid": False, "path": str(args.path), "error": str(exc)}))
            else:
                print(f"invalid bundle: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"valid": True, **describe(model)}, indent=2))
        else:
            print(f"valid bundle: {model.name} {model.version} ({model.mode.value})")
            print(_text(describe(model)))
        return 0

    registry = ModelRegistry.discover(default_model_directories(settings), device=device)
    if args.models_command == "list":
        return _list(registry, as_json=args.json)
    try:
        model = registry.get(args.name, args.version)
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    description = describe(model)
    print(json.dumps(description, indent=2) if args.json else _text(description))
    return 0


def describe(model: Any) -> dict[str, Any]:
    """Everything worth knowing about an installed model, as JSON-ready data."""
    rule = model.rule
    evaluation = model.path / "docs" / "evaluation.json"
    return {
        "name": model.name,
        "version": model.version,
        "weights_sha256": model.identity.weights_sha256,
        "mode": model.mode.value,
        "path": str(model.path),
        "weights": str(model.weights_file),
        "device": model.device,
        "description": model.description,
        "rule": {
            "modality": list(rule.modality),
            "body_part": list(rule.body_part),
            "body_part_keywords": list(rule.body_part_keywords),
            "series_description": rule.series_description,
            "exclude_series_description": rule.exclude_series_description,
            "image_type_includes": list(rule.image_type_includes),
            "min_instances": rule.min_instances,
            "max_instances": rule.max_instances,
        },
        "input": {
            "channels": model.input.channels,
            "spatial_size": list(model.input.spatial_size or []) or None,
            "intensity_window": list(model.input.intensity_window or []) or None,
            "axes": model.input.axes,
        },
        "findings": [
            {
                "key": f.key,
                "concept": {
                    "value": f.concept.value,
                    "scheme_designator": f.concept.scheme_designator,
                    "meaning": f.concept.meaning,
                },
                "severity": f.severity.value,
                "threshold": f.threshold,
            }
            for f in model.findings
        ],
        "model_card": str(model.path / "docs" / "README.md"),
        "evaluation": json.loads(evaluation.read_text()) if evaluation.is_file() else None,
    }


def _list(registry: Any, *, as_json: bool) -> int:
    models = registry.models()
    if as_json:
        print(
            json.dumps(
                {
                    "models": [describe(m) for m in models],
                    "problems": [
                        {"path": str(p.path), "error": p.message} for p in registry.problems
                    ],
                },
                indent=2,
            )
        )
        return 0
    header = ("NAME", "VERSION", "MODE", "FINDINGS", "MODALITY", "WEIGHTS SHA-256", "PATH")
    rows = [
        (
            m.name,
            m.version,
            m.mode.value,
            ",".join(f"{f.key}({f.severity.value})" for f in m.findings),
            ",".join(m.rule.modality),
            m.identity.weights_sha256[:16],
            str(m.path),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
    if not models:
        print("(no models installed)")
    for problem in registry.problems:
        print(f"skipped: {problem.message}")
    return 0


def _text(description: dict[str, Any]) -> str:
    lines = []
    for key in ("name", "version", "mode", "weights_sha256", "path", "device", "description"):
        lines.append(f"{key}: {description[key]}")
    rule = {k: v for k, v in description["rule"].items() if v not in (None, [])}
    lines.append(f"rule: {json.dumps(rule)}")
    lines.append(f"input: {json.dumps(description['input'])}")
    for finding in description["findings"]:
        concept = finding["concept"]
        lines.append(
            f"finding {finding['key']}: ({concept['value']}, {concept['scheme_designator']}, "
            f'"{concept["meaning"]}") severity {finding["severity"]}, '
            f"threshold {finding['threshold']}"
        )
    lines.append(f"model card: {description['model_card']}")
    evaluation = description.get("evaluation")
    if evaluation:
        numbers = ", ".join(
            f"{k} {evaluation[k]}"
            for k in ("auc", "sensitivity", "specificity", "n_test")
            if k in evaluation
        )
        lines.append(f"evaluation: {numbers}")
    return "\n".join(lines)
