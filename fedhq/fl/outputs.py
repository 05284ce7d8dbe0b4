"""Output folders: a command never silently overwrites an earlier run's results. One
rule for ``fedhq run`` and ``fedhq compare``: a folder that already holds results is
refused unless the user resumes it or asks to overwrite it."""

from __future__ import annotations

import os
import tempfile
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
    check_writable_dir(folder, "--output")
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


def check_writable_dir(folder: str | Path, what: str) -> None:
    """ConfigError (one line naming ``what``) unless ``folder`` is, or can be made, a
    directory this process can write to; creates it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise ConfigError(f"{what} {folder} is a file, not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"{what} {folder} is under a file, not a directory") from None
    except OSError as error:
        raise ConfigError(f"{what} {folder} is not writable: {error.strerror or error}") from None


def check_writable_file(path: str | Path, what: str) -> None:
    """ConfigError (one line naming ``what``) unless a file can be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory")
    check_writable_dir(path.parent, what + " folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
