"""The container path, run for real on a machine that reaches no container registry.

- :func:`debian_base`: a Debian 12 image made here (``debootstrap --variant=minbase`` +
  ``docker import``), the base of both images below.
- :func:`build_streamproc`: the project's ``Dockerfile`` on that base. pip in the build trusts
  this machine's CA bundle, handed in as ``build-ca.pem`` in a build context assembled in a
  temporary directory (the repository never holds it; the image's final stage never sees it).
- :func:`build_kafka`: ``kafka/image/`` with the Maven jars of ``scripts/kafka.sh``.
- :class:`ComposeStack`: the project's ``docker-compose.yml`` with the image names and host ports
  set through its variables and ``tests/compose.cpu.yml`` dropping the GPU reservation; leaving
  it always runs ``docker compose down -v``.

Builds use ``--network=host`` and the classic builder (no buildx needed). Used by
``tests/test_container.py`` (``make container-test``) and ``bench/images.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.helpers import REPO_ROOT, copy_project

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CPU_OVERRIDE = REPO_ROOT / "tests" / "compose.cpu.yml"
KAFKA_IMAGE_DIR = REPO_ROOT / "kafka" / "image"

TAG_PREFIX = os.environ.get("CONTAINER_TEST_TAG_PREFIX", "streamproc-test")
BASE_TAG = f"{TAG_PREFIX}/debian:bookworm"
KAFKA_TAG = f"{TAG_PREFIX}/kafka:4.1.1"
STREAMPROC_TAG = f"{TAG_PREFIX}/streamproc:latest"

DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The CA bundle this machine's pip trusts (PIP_CERT), else the system's.
HOST_CA_BUNDLE = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")


def sh(*cmd: str, env: Mapping[str, str] | None = None, capture: bool = False,
       stdin: int | None = None, timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; its output goes to stderr (the test log) unless captured. Raises on failure,
    with the captured output in the message."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, stdin=stdin, text=True, timeout=timeout_s,
        stdout=subprocess.PIPE if capture else sys.stderr.fileno(),
        stderr=subprocess.PIPE if capture else None, check=False,
    )
    if result.returncode != 0:
        detail = f"\n{result.stdout}\n{result.stderr}"[-4000:] if capture else ""
        raise RuntimeError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited "
                           f"{result.returncode}{detail}")
    return result


def debian_base(tag: str = BASE_TAG) -> float:
    """Make the Debian 12 base image ``tag`` from nothing; returns the seconds it took."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="debian-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR,
           capture=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            sh("docker", "import", "-", tag, stdin=tar.stdout.fileno() if tar.stdout else None)
        finally:
            if tar.stdout:
                tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {rootfs} exited {tar.returncode}")
    return time.monotonic() - started


def build(context: Path, tag: str, build_args: Mapping[str, str], *,
          target: str | None = None, no_cache: bool = False) -> float:
    """``docker build`` ``context`` into ``tag``; returns the seconds it took."""
    cmd = ["docker", "build", "--network=host", "--tag", tag]
    cmd += [f"--build-arg={key}={val}" for key, val in build_args.items()]
    if target:
        cmd += ["--target", target]
    if no_cache:
        cmd.append("--no-cache")
    started = time.monotonic()
    sh(*cmd, str(context), env={"DOCKER_BUILDKIT": "0"})
    return time.monotonic() - started


def streamproc_context(dest: Path, ca_bundle: Path | None = HOST_CA_BUNDLE) -> Path:
    """The repository's files in ``dest``, plus ``build-ca.pem`` when ``ca_bundle`` exists."""
    copy_project(dest)
    if ca_bundle is not None and ca_bundle.is_file():
        shutil.copyfile(ca_bundle, dest / "build-ca.pem")
    return dest


def build_streamproc(tag: str = STREAMPROC_TAG, base: str = BASE_TAG, *,
                     target: str | None = None, no_cache: bool = False) -> float:
    with tempfile.TemporaryDirectory(prefix="streamproc-context-") as tmp:
        context = streamproc_context(Path(tmp))
        return build(context, tag, {"BASE_IMAGE": base}, target=target, no_cache=no_cache)


def kafka_jars() -> Path:
    """The broker's jars (fetched once by ``scripts/kafka.sh jars``)."""
    out = sh("bash", str(REPO_ROOT / "scripts" / "kafka.sh"), "jars", capture=True).stdout
    return Path(out.strip().splitlines()[-1])


def build_kafka(tag: str = KAFKA_TAG, base: str = BASE_TAG) -> float:
    with tempfile.TemporaryDirectory(prefix="kafka-context-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(KAFKA_IMAGE_DIR, context)
        shutil.copytree(kafka_jars(), context / "libs", ignore=shutil.ignore_patterns(".*"))
        return build(context, tag, {"BASE_IMAGE": base, "EXTRAS": ""})  # CPU: no cuBLAS


def image_bytes(tag: str) -> int:
    return int(sh("docker", "image", "inspect", "--format", "{{.Size}}", tag,
                  capture=True).stdout.strip())


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                          check=False).returncode == 0


def remove_images(*tags: str) -> None:
    """Remove ``tags`` (those present) and the dangling layers and build cache they leave."""
    present = [t for t in tags if image_exists(t)]
    if present:
        sh("docker", "image", "rm", "--force", *present, capture=True)
    sh("docker", "image", "prune", "--force", capture=True)
    sh("docker", "builder", "prune", "--force", capture=True)


class ComposeStack:
    """``docker compose`` on the project's file: ``up --wait`` on enter, ``down -v`` on exit,
    whatever happened in between. ``variables`` fill the file's ``${...}`` (images, host ports,
    env file, models directory)."""

    def __init__(self, project: str, variables: Mapping[str, str],
                 files: Sequence[Path] = (COMPOSE_FILE, CPU_OVERRIDE)) -> None:
        self.project = project
        self.variables = dict(variables)
        self.files = tuple(files)

    def compose(self, *args: str, capture: bool = False,
                timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("--file", str(path))]
        return sh("docker", "compose", "--project-name", self.project,
                  "--project-directory", str(REPO_ROOT), *files, *args,
                  env=self.variables, capture=capture, timeout_s=timeout_s)

    def up(self, timeout_s: int = 420) -> None:
        """Start every service from local images only and wait until all are healthy (or, for
        kafka-init, done)."""
        self.compose("up", "--detach", "--no-build", "--pull", "never", "--wait",
                     "--wait-timeout", str(timeout_s), timeout_s=timeout_s + 60)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "--all", "--quiet", service, capture=True).stdout.strip()
        if not cid:
            raise RuntimeError(f"no container for service {service}")
        return cid.splitlines()[0]

    def state(self, service: str) -> dict[str, object]:
        """``docker inspect``'s State of the service's container (Status, ExitCode, Health)."""
        out = sh("docker", "inspect", "--format", "{{json .State}}", self.container(service),
                 capture=True).stdout
        state = json.loads(out)
        assert isinstance(state, dict)
        return state

    def logs(self, service: str | None = None) -> str:
        args = ["logs", "--no-color", "--timestamps"] + ([service] if service else [])
        result = self.compose(*args, capture=True)
        return result.stdout + result.stderr

    def __enter__(self) -> ComposeStack:
        try:
            self.up()
        except BaseException:
            self._show_logs_and_down()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.down()
        else:
            self._show_logs_and_down()

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")

    def _show_logs_and_down(self) -> None:
        try:
            print(self.logs()[-20000:], file=sys.stderr)
        finally:
            self.down()
