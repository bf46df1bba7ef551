"""Build the worker image: a host-side wheelhouse, a base image and the worker on top.

Each step is cached and runs only when its result is missing:

1. wheelhouse: `pip download` of CPU-only torch, pyzmq and numpy into the cache folder
   ($AMP4EC_CACHE, default ~/.cache/amp4ec), so the image build needs no network inside
   the container;
2. base image: Debian bookworm from `debootstrap --variant=minbase`, imported with
   `docker import` (for machines without a container registry), with iproute2 for link
   shaping, or an image the user names, such as python:3.11-slim;
3. worker image: the Dockerfile template in image/ plus worker.py and the wheelhouse, tagged
   amp4ec-worker:<content hash> so a change to any input builds a new image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from amp4ec.errors import DockerError

PROJECT_LABEL = "amp4ec.project"
PROJECT_LABEL_VALUE = "amp4ec"

# Workers run CPU-only torch: the CUDA build needs about 520 MB of memory just to import,
# more than a 512 MB edge container has. The wheels are cp311, so the base image must
# provide Python 3.11 (Debian bookworm does).
TORCH_REQUIREMENT = "torch==2.13.0+cpu"
WORKER_REQUIREMENTS = (TORCH_REQUIREMENT, "pyzmq", "numpy")
WHEELHOUSE_NAME = "wheelhouse-torch-2.13.0-cpu-cp311"

DEBIAN_SUITE = "bookworm"
# iproute2 provides tc and ip, which shape a worker's link (amp4ec.real.shaping).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "iproute2")
# The tag names the package list, so adding a package builds a new base image.
DEFAULT_BASE_TAG = (
    f"amp4ec-base:{DEBIAN_SUITE}-{hashlib.sha256(' '.join(BASE_PACKAGES).encode()).hexdigest()[:8]}"
)
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
WORKER_REPOSITORY = "amp4ec-worker"

IMAGE_DIR = Path(__file__).with_name("image")
DOCKERFILE_TEMPLATE = IMAGE_DIR / "Dockerfile.template"
WORKER_SCRIPT = IMAGE_DIR / "worker.py"

# A wheel name with one of these parts belongs to a GPU build and must not reach the image.
CUDA_WHEEL_MARKERS = ("nvidia", "cuda", "triton", "+cu")

Log = Callable[[str], None]


def cache_dir() -> Path:
    """Return the cache folder: $AMP4EC_CACHE, or ~/.cache/amp4ec."""
    configured = os.environ.get("AMP4EC_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "amp4ec"


def ensure_worker_image(
    client,
    *,
    base_image: str | None = None,
    rebuild: bool = False,
    log: Log = print,
) -> str:
    """Return the tag of a ready worker image, building the missing steps.

    base_image None builds (or reuses) the debootstrapped Debian base, which needs root and
    debootstrap. Any other value is used as the FROM image and must provide python3 3.11
    with the venv module. rebuild=True rebuilds the base (when debootstrapped) and the
    worker image, but keeps a complete wheelhouse. Raises DockerError naming the failed step.
    """
    check_engine(client)
    wheelhouse = ensure_wheelhouse(log=log)
    if base_image is None:
        base_image = ensure_base_image(client, rebuild=rebuild, log=log)
    else:
        require_image(client, base_image)
    dockerfile = render_dockerfile(base_image)
    tag = worker_image_tag(dockerfile, wheelhouse)
    if not rebuild and image_exists(client, tag):
        log(f"worker image {tag} is up to date")
        return tag
    build_worker_image(client, tag, dockerfile, wheelhouse, log=log)
    # Stale images stay: another process may be about to start containers from one.
    stale_tags = stale_worker_images(client, keep=tag)
    if stale_tags:
        log(
            f"worker image: {len(stale_tags)} older worker images remain ({', '.join(stale_tags)}); "
            "remove_stale_worker_images removes them"
        )
    return tag


def check_engine(client) -> None:
    import docker.errors
    import requests.exceptions

    try:
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        from amp4ec.real.containers import ENGINE_FIX

        raise DockerError(f"Docker engine not reachable ({error}). {ENGINE_FIX}") from error


def image_exists(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def require_image(client, name: str) -> None:
    if image_exists(client, name):
        return
    import docker.errors

    try:
        client.images.pull(name)
    except docker.errors.DockerException as error:
        raise DockerError(
            f"base image {name!r} is not present and cannot be pulled ({error}). Pull or load "
            "it first, or pass no base image to build a Debian base with debootstrap."
        ) from error


# Wheelhouse


def ensure_wheelhouse(*, log: Log = print) -> Path:
    """Return the folder of wheels the worker image installs, downloading it if missing."""
    wheelhouse = cache_dir() / WHEELHOUSE_NAME
    if (wheelhouse / "COMPLETE").is_file():
        return wheelhouse
    wheelhouse.parent.mkdir(parents=True, exist_ok=True)
    log(f"wheelhouse: downloading {' '.join(WORKER_REQUIREMENTS)} into {wheelhouse}")
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=wheelhouse.parent))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--only-binary=:all:",
            "--dest", str(staging), *WORKER_REQUIREMENTS,
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise DockerError(
                f"pip download of the worker wheels failed (exit status {completed.returncode}): "
                f"{tail(completed.stderr)}\nThe wheelhouse needs a pip index or find-links "
                f"that provides {TORCH_REQUIREMENT} for Python 3.11 on x86_64."
            )
        names = sorted(path.name for path in staging.glob("*.whl"))
        gpu_wheels = [name for name in names if any(marker in name.lower() for marker in CUDA_WHEEL_MARKERS)]
        if gpu_wheels:
            raise DockerError(
                f"pip download brought GPU wheels into the wheelhouse: {', '.join(gpu_wheels)}. "
                f"The worker needs the CPU-only build {TORCH_REQUIREMENT}; check pip's index "
                "and find-links settings."
            )
        (staging / "COMPLETE").write_text("\n".join(names) + "\n")
        if wheelhouse.exists():
            shutil.rmtree(wheelhouse)
        staging.rename(wheelhouse)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    total_bytes = sum(path.stat().st_size for path in wheelhouse.glob("*.whl"))
    log(
        f"wheelhouse: {len(names)} wheels, {total_bytes / 1e6:.0f} MB, "
        f"in {time.monotonic() - started:.1f} s"
    )
    return wheelhouse


def wheel_names(wheelhouse: Path) -> list[str]:
    return sorted(path.name for path in wheelhouse.glob("*.whl"))


# Base image


def ensure_base_image(client, *, rebuild: bool = False, log: Log = print) -> str:
    """Return the tag of the Debian base image, building it with debootstrap if missing."""
    if not rebuild and image_exists(client, DEFAULT_BASE_TAG):
        return DEFAULT_BASE_TAG
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DockerError(
            "debootstrap not found, and it builds the base image on machines without a "
            "container registry. Install it (`apt-get install debootstrap`), or pass a base "
            "image with Python 3.11, such as python:3.11-slim, if you can pull from a registry."
        )
    if os.geteuid() != 0:
        raise DockerError(
            f"building the base image with debootstrap needs root, and this process runs as "
            f"uid {os.geteuid()}. Run the build once as root, or pass a base image with "
            "Python 3.11, such as python:3.11-slim."
        )
    mirror = os.environ.get("AMP4EC_DEBIAN_MIRROR", DEFAULT_DEBIAN_MIRROR)
    work_root = cache_dir()
    work_root.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="base-", dir=work_root))
    root_dir = work_dir / "rootfs"
    tar_path = work_dir / "rootfs.tar"
    try:
        log(f"base image: debootstrap {DEBIAN_SUITE} from {mirror} into {root_dir}")
        started = time.monotonic()
        command = [
            debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            DEBIAN_SUITE, str(root_dir), mirror,
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            debootstrap_log = root_dir / "debootstrap" / "debootstrap.log"
            details = debootstrap_log.read_text(errors="replace") if debootstrap_log.is_file() else ""
            raise DockerError(
                f"debootstrap failed (exit status {completed.returncode}): "
                f"{tail(completed.stderr + completed.stdout + details)}\n"
                f"Check that {mirror} is reachable, or set AMP4EC_DEBIAN_MIRROR."
            )
        log(f"base image: debootstrap done in {time.monotonic() - started:.1f} s")

        started = time.monotonic()
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root_dir / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(root_dir), "-cf", str(tar_path), "."],
            check=True, capture_output=True,
        )  # fmt: skip
        repository, tag = DEFAULT_BASE_TAG.split(":")
        changes = [
            f"LABEL {PROJECT_LABEL}={PROJECT_LABEL_VALUE}",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
        ]
        try:
            client.api.import_image_from_file(str(tar_path), repository=repository, tag=tag, changes=changes)
        except Exception as error:
            raise DockerError(f"docker import of the base image {DEFAULT_BASE_TAG} failed: {error}") from error
        if not image_exists(client, DEFAULT_BASE_TAG):
            raise DockerError(f"docker import reported no error, but image {DEFAULT_BASE_TAG} does not exist")
        log(
            f"base image: imported {DEFAULT_BASE_TAG} ({tar_path.stat().st_size / 1e6:.0f} MB tar) "
            f"in {time.monotonic() - started:.1f} s"
        )
    finally:
        remove_build_dir(work_dir)
    return DEFAULT_BASE_TAG


def remove_build_dir(work_dir: Path) -> None:
    # debootstrap mounts /proc and /sys inside the target while it runs. A failed run can
    # leave them mounted, and a recursive delete must not descend into them.
    resolved = str(work_dir.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        mounted = [line.split()[1] for line in mounts if line.split()[1].startswith(resolved + "/")]
    if mounted:
        raise DockerError(
            f"filesystems are still mounted under {work_dir}: {', '.join(mounted)}. "
            f"Unmount them (`umount {' '.join(mounted)}`), then remove {work_dir}."
        )
    shutil.rmtree(work_dir, ignore_errors=True)


# Worker image


def render_dockerfile(base_image: str) -> str:
    template = DOCKERFILE_TEMPLATE.read_text(encoding="utf-8")
    return template.replace("{base_image}", base_image).replace(
        "{requirements}", " ".join(WORKER_REQUIREMENTS)
    )


def worker_image_tag(dockerfile: str, wheelhouse: Path) -> str:
    """Return amp4ec-worker:<hash of the Dockerfile, worker.py and wheel file names>."""
    digest = hashlib.sha256()
    digest.update(dockerfile.encode("utf-8"))
    digest.update(b"\0")
    digest.update(WORKER_SCRIPT.read_bytes())
    for name in wheel_names(wheelhouse):
        digest.update(b"\0" + name.encode("utf-8"))
    return f"{WORKER_REPOSITORY}:{digest.hexdigest()[:12]}"


def build_worker_image(client, tag: str, dockerfile: str, wheelhouse: Path, *, log: Log = print) -> None:
    import docker.errors

    log(f"worker image: building {tag}")
    started = time.monotonic()
    context_dir = Path(tempfile.mkdtemp(prefix="worker-context-", dir=cache_dir()))
    try:
        (context_dir / "Dockerfile").write_text(dockerfile, encoding="utf-8")
        shutil.copy2(WORKER_SCRIPT, context_dir / "worker.py")
        wheels_dir = context_dir / "wheels"
        wheels_dir.mkdir()
        for name in wheel_names(wheelhouse):
            link_or_copy(wheelhouse / name, wheels_dir / name)
        output_lines: list[str] = []
        try:
            stream = client.api.build(
                path=str(context_dir),
                tag=tag,
                labels={PROJECT_LABEL: PROJECT_LABEL_VALUE},
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise DockerError(
                        f"docker build of {tag} failed: {chunk['error'].strip()}\n"
                        f"last build output:\n{tail(''.join(output_lines))}"
                    )
                text = chunk.get("stream")
                if text:
                    output_lines.append(text)
                    if text.startswith("Step "):
                        log(f"worker image: {text.strip()} ({time.monotonic() - started:.0f} s)")
        except docker.errors.DockerException as error:
            raise DockerError(f"docker build of {tag} failed: {error}") from error
    finally:
        shutil.rmtree(context_dir, ignore_errors=True)
    if not image_exists(client, tag):
        raise DockerError(f"docker build of {tag} finished but the image does not exist")
    size_bytes = client.images.get(tag).attrs.get("Size", 0)
    log(f"worker image: built {tag} ({size_bytes / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s")


def stale_worker_images(client, *, keep: str) -> list[str]:
    """Return the amp4ec-worker tags other than keep, left by earlier builds (about 1 GB each)."""
    stale_tags = []
    for image in client.images.list(name=WORKER_REPOSITORY, filters={"label": f"{PROJECT_LABEL}={PROJECT_LABEL_VALUE}"}):
        if keep in image.tags:
            continue
        stale_tags.extend(tag for tag in image.tags if tag.startswith(f"{WORKER_REPOSITORY}:"))
    return sorted(stale_tags)


def remove_stale_worker_images(client, *, keep: str, log: Log = print) -> list[str]:
    """Remove the amp4ec-worker tags other than keep; return the removed tags.

    An image that a container still uses stays, because the engine rejects its removal.
    """
    import docker.errors

    removed = []
    for tag in stale_worker_images(client, keep=keep):
        try:
            client.images.remove(tag)
        except docker.errors.APIError as error:
            log(f"worker image: kept {tag}, which is still in use ({error.explanation or error})")
        else:
            removed.append(tag)
            log(f"worker image: removed stale {tag}")
    return removed


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def image_info(client, tag: str) -> dict:
    """Return facts about a worker image: id, size, labels, and the torch, numpy and pyzmq
    versions printed by its own Python."""
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound as error:
        raise DockerError(f"image {tag} not found; build it with ensure_worker_image") from error
    script = (
        "import json, sys, torch, numpy, zmq; "
        "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
        "'numpy': numpy.__version__, 'pyzmq': zmq.__version__, "
        "'cuda': torch.version.cuda}))"
    )
    try:
        output = client.containers.run(
            tag,
            ["python", "-c", script],
            remove=True,
            network_disabled=True,
            labels={PROJECT_LABEL: PROJECT_LABEL_VALUE},
        )
    except docker.errors.DockerException as error:
        raise DockerError(f"cannot read the versions inside {tag}: {error}") from error
    info = {
        "tag": tag,
        "id": image.id,
        "size_bytes": image.attrs.get("Size"),
        "labels": image.labels,
    }
    info.update(json.loads(output.decode("utf-8").strip().splitlines()[-1]))
    return info


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
