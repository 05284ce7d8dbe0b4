"""The profile file: one versioned JSON schema for measured profiles and device presets
(fedhq/devices/*.json); its layout is in docs/profile.md. ``validate`` names every
missing or bad field by its dotted path; ``load`` validates; ``dump`` validates first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhq_kernels.checks import is_real

SCHEMA = "fedhq-profile"
SCHEMA_VERSION = 1
KINDS = ("measured", "preset")
STRATEGIES = ("ptq", "qat")

# What every profile must have (dotted paths); the value must be a number > 0 where
# the path ends in ".median" or names a size.
_REQUIRED_ALWAYS = (
    "device.name",
    "device.type",
    "device.memory_bytes",
    "figures.copy_bandwidth_gbps.median",
    "figures.matmul_tflops.float32.median",
    "figures.launch_overhead_us.median",
)
_REQUIRED_MEASURED = ("timestamp", "software.torch")
_POSITIVE = {
    "device.memory_bytes",
    "figures.copy_bandwidth_gbps.median",
    "figures.matmul_tflops.float32.median",
    "figures.launch_overhead_us.median",
}
_BATCH_FIELDS = ("batch", "step_s.median", "peak_memory_bytes", "ops", "flops", "bytes_compute", "bytes_other")
_MODEL_FIELDS = ("params", "strategies")


class ProfileError(ValueError):
    """A profile that cannot be used: the message names the file and the field(s)."""


_MISSING = object()


def get_path(doc: Any, path: str, default: Any = _MISSING) -> Any:
    node = doc
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def validate(doc: Any, source: str = "profile") -> dict:
    """Returns ``doc`` if it is a usable profile of this schema version, else raises
    ProfileError naming ``source`` and every missing or invalid field."""
    if not isinstance(doc, Mapping):
        raise ProfileError(f"{source}: a profile must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise ProfileError(
            f"{source}: field 'schema' must be {SCHEMA!r}, got {doc.get('schema')!r} (not a fedhq profile?)"
        )
    version = doc.get("schema_version")
    if version is None:
        raise ProfileError(f"{source}: missing field 'schema_version'")
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{source}: field 'schema_version' is {version!r}, which this fedhq cannot read (it reads version "
            f"{SCHEMA_VERSION}); re-run `fedhq profile` to write a current profile"
        )
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ProfileError(f"{source}: field 'kind' must be one of {KINDS}, got {kind!r}")
    required = _REQUIRED_ALWAYS + (_REQUIRED_MEASURED if kind == "measured" else ())
    missing = [p for p in required if get_path(doc, p, None) is None]
    if missing:
        raise ProfileError(f"{source}: missing field(s) {', '.join(missing)}")
    bad = [p for p in _POSITIVE if not (is_real(get_path(doc, p)) and get_path(doc, p) > 0)]
    if bad:
        raise ProfileError(
            f"{source}: field(s) {', '.join(f'{p} = {get_path(doc, p)!r}' for p in sorted(bad))} must be numbers > 0"
        )
    models = doc.get("models", {})
    if not isinstance(models, Mapping):
        raise ProfileError(f"{source}: field 'models' must be an object keyed by model spec")
    for key, entry in models.items():
        _validate_model(source, f"models.{key}", entry)
    return dict(doc)


def _validate_model(source: str, where: str, entry: Any) -> None:
    missing = [f"{where}.{f}" for f in _MODEL_FIELDS if get_path(entry, f, None) is None]
    if missing:
        raise ProfileError(f"{source}: missing field(s) {', '.join(missing)}")
    if not (is_real(entry["params"]) and entry["params"] > 0):
        raise ProfileError(f"{source}: field {where}.params must be a number > 0, got {entry['params']!r}")
    strategies = entry["strategies"]
    if not isinstance(strategies, Mapping) or not strategies:
        raise ProfileError(f"{source}: field {where}.strategies must name at least one of {STRATEGIES}")
    for name, strategy in strategies.items():
        at = f"{where}.strategies.{name}"
        if name not in STRATEGIES:
            raise ProfileError(f"{source}: unknown strategy {at} (expected one of {STRATEGIES})")
        batches = get_path(strategy, "batches", None)
        if not isinstance(batches, list) or not batches:
            raise ProfileError(f"{source}: missing field {at}.batches (a non-empty list)")
        for i, row in enumerate(batches):
            missing = [f"{at}.batches.{i}.{f}" for f in _BATCH_FIELDS if get_path(row, f, None) is None]
            if missing:
                raise ProfileError(f"{source}: missing field(s) {', '.join(missing)}")
            for f in _BATCH_FIELDS:
                v = get_path(row, f)
                if not is_real(v) or v < 0 or (f in ("batch", "step_s.median", "peak_memory_bytes") and v <= 0):
                    raise ProfileError(f"{source}: field {at}.batches.{i}.{f} must be a number > 0, got {v!r}")
        sizes = [row["batch"] for row in batches]
        if len(set(sizes)) != len(sizes):
            raise ProfileError(f"{source}: {at}.batches repeats a batch size: {sizes}")


def load(path: str | Path) -> dict:
    """Reads and validates a profile file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ProfileError(f"{path}: cannot read the profile ({error.strerror or error})") from error
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path}: not valid JSON ({error})") from error
    return validate(doc, str(path))


def dumps(doc: Mapping) -> str:
    validate(doc, "profile to write")
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def dump(doc: Mapping, path: str | Path) -> Path:
    """Validates and writes ``doc`` (creating the directory)."""
    path = Path(path)
    text = dumps(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
