"""Run directories that appear whole or not at all, and describe the run that made them."""

from __future__ import annotations

import contextlib
import glob
import json
import os
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


# Every directory staged_output creates contains this file; --force replaces only such directories.
OUTPUT_MARKER = ".amp4ec-output"


def written_by_amp4ec(out: Path) -> bool:
    """Tell whether ``out`` is an output directory amp4ec wrote.

    It is when it contains OUTPUT_MARKER, or, for runs written before the marker existed, a
    run.json that amp4ec wrote (a JSON object with the run's mode and amp4ec's version).
    """
    if (out / OUTPUT_MARKER).is_file():
        return True
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "mode" in info and "amp4ec" in (info.get("versions") or {})


def check_output_dir(out: Path, *, force: bool) -> None:
    """Reject an output directory that already contains files, unless ``force`` is set.

    Even with ``force``, only a directory that amp4ec wrote is replaced (see
    written_by_amp4ec), and never the current directory or one of its parents.
    """
    if out.exists() and not out.is_dir():
        raise UsageError("exists and is not a directory; choose another --out", source=str(out))
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"is inside {parent}, which is a file, not a directory; choose another --out", source=str(out))
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UsageError(
            "output directory is not empty; choose another --out, or pass --force to replace an earlier amp4ec run",
            source=str(out),
        )
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UsageError("is the current directory or one of its parents; choose a new directory for --out", source=str(out))
    if not written_by_amp4ec(out):
        raise UsageError(
            f"was not written by amp4ec (no {OUTPUT_MARKER} file and no run.json of an amp4ec run), "
            "so --force does not replace it and nothing in it was touched; choose a new directory for --out",
            source=str(out),
        )


def remove_stale_staging(out: Path) -> None:
    """Remove staging directories for ``out`` that a killed amp4ec process left behind.

    A directory is removed only when the process id in its name no longer exists and it
    contains the output marker. A run in progress and anything amp4ec did not write stay.
    """
    for candidate in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid_text = candidate.name[len(f".{out.name}.partial-") :].split("-", 1)[0]
        if not pid_text.isdigit() or not (candidate / OUTPUT_MARKER).is_file():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:
            # The process exists under another user.
            continue


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out`` and move it into place only on success.

    On any exception, Ctrl-C included, the temporary directory is removed and ``out`` is left
    as it was.
    """
    check_output_dir(out, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        # The process id in the name lets a later run tell a killed run's leftover from a live one.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise UsageError(f"cannot create the output directory: {exc.strerror or exc}; choose another --out", source=str(out)) from exc
    # mkdtemp makes the directory private to its owner; give it the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    (staging / OUTPUT_MARKER).write_text("written by amp4ec; `--force` may replace this directory\n")
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
