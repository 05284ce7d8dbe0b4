"""Output folders: a command never silently overwrites an earlier run's results. One
rule for ``fedhq run`` and ``fedhq compare``: a folder that already holds results is
refused unless the user resumes it or asks to overwrite it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedhq.fl.config import ConfigError


def claim_output(folder: str | Path, patterns: Iterable[str], *, resume: bool, overwrite: bool) -> None:
    """Raises ConfigError when ``folder`` holds a file matching ``patterns`` (globs
    relative to it) and neither ``resume`` nor ``overwrite`` is set. With
    ``overwrite`` those files are deleted first, so that nothing left from the earlier
    run can be read as this one's (a crash mid-run leaves no stale results.json)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the results in the output folder and --overwrite replaces them: pass one")
    folder = Path(folder)
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not found or resume:
        return
    if not overwrite:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(
            f"{folder} already holds results ({names}): pass --resume to continue them, "
            "--output DIR for a new folder, or --overwrite to replace them"
        )
    for path in found:
        path.unlink()
