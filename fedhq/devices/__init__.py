"""Device presets: hardware profiles of devices nobody here can measure (the paper's
RTX A6000, a Jetson-class and a phone-class client), as data files in this directory
(schema: fedhq.profile.schema, kind "preset"). Each file cites the sources of
its figures and marks estimates; the speed model (fedhq.analysis.speed) scales a
measured profile's step times to them.

    load_preset("rtx-a6000")     names: preset_names()
"""

from __future__ import annotations

import json
from importlib import resources

from fedhq.profile import schema


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """The preset called ``name`` (file name without .json), validated."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown device preset {name!r}; known presets: {', '.join(names)}")
    resource = resources.files(__name__) / f"{name}.json"
    try:
        doc = json.loads(resource.read_text())
    except json.JSONDecodeError as error:
        raise schema.ProfileError(f"device preset {name}: not valid JSON ({error})") from error
    return schema.validate(doc, f"device preset {name}")
