"""Run directories that appear whole or not at all, and describe the run that made them."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from amp4ec.errors import UsageError


def check_output_dir(out: Path, *, force: bool) -> None:
    """Reject an output directory that already holds files, unless ``force`` is set."""
    if out.exists() and not out.is_dir():
        raise UsageError("exists and is not a directory; choose another --out", source=str(out))
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError("output directory is not empty; choose another --out or pass --force to replace it", source=str(out))


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out`` and move it into place only on success.

    On any exception, Ctrl-C included, the temporary directory is removed and ``out`` is left
    as it was.
    """
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("amp4ec", "simpy", "numpy", "pandas", "torch", "docker", "pyzmq"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunInfo:
    """What went into a run: command, resolved scenario, seed, versions and wall time."""

    def __init__(self, mode: str, scenario: dict[str, Any], calibration: str):
        self.mode = mode
        self.scenario = scenario
        self.calibration = calibration
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()

    def write(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        info = {
            "mode": self.mode,
            "command": sys.argv,
            "started": self.started.isoformat(),
            "wall_time_s": time.perf_counter() - self._t0,
            "seed": self.scenario["seed"],
            "calibration": self.calibration,
            "versions": versions(),
            "scenario": self.scenario,
        }
        info.update(extra or {})
        (directory / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
