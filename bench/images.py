"""The container images: build time from nothing on this machine, sizes, and what the layout buys.

Builds, in one run, with tests/container_stack.py (the container test's builds):
  1. the Debian 12 base (debootstrap + docker import) and the Kafka image on it;
  2. the streamproc image, cold;
  3. its ``builder`` stage as an image of its own (cached), to compare with the runtime stage;
  4. the streamproc image again after a one-line source change: the dependency layers come
     from the cache, so this is what a code change costs.

Prints seconds and sizes, and two ratios against this run's own numbers: source-change rebuild
/ cold build, and runtime image / builder stage. Removes its images at the end.

    .venv/bin/python -m bench.images      # needs a Docker engine: bash scripts/docker_engine.sh
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
from pathlib import Path

from tests import container_stack as cs

PREFIX = "streamproc-bench"
BASE, KAFKA = f"{PREFIX}/debian:bookworm", f"{PREFIX}/kafka:4.1.1"
APP, BUILDER = f"{PREFIX}/streamproc:latest", f"{PREFIX}/streamproc:builder"


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"commit {commit}; {platform.node()}; shared 2-core machine")
    seconds: dict[str, float] = {}
    try:
        seconds["debian base (debootstrap + import)"] = cs.debian_base(BASE)
        seconds["kafka image"] = cs.build_kafka(KAFKA, BASE)
        with tempfile.TemporaryDirectory(prefix="streamproc-context-") as tmp:
            context = cs.streamproc_context(Path(tmp))
            args = {"BASE_IMAGE": BASE}
            seconds["streamproc image, cold"] = cs.build(context, APP, args)
            seconds["builder stage (cached)"] = cs.build(context, BUILDER, args, target="builder")
            init = context / "streamproc" / "__init__.py"
            init.write_text(init.read_text(encoding="utf-8") + "# a source change\n",
                            encoding="utf-8")
            seconds["streamproc image, source change"] = cs.build(context, APP, args)
        sizes = {tag: cs.image_bytes(tag) for tag in (BASE, KAFKA, BUILDER, APP)}
    finally:
        cs.remove_images(APP, BUILDER, KAFKA, BASE)

    for what, s in seconds.items():
        print(f"{what:40s} {s:7.1f} s")
    for tag, size in sizes.items():
        print(f"{tag:40s} {size / 1e6:9.0f} MB")
    rebuild = seconds["streamproc image, source change"] / seconds["streamproc image, cold"]
    print(f"source-change rebuild / cold build: {rebuild:.3f}")
    print(f"runtime image / builder stage: {sizes[APP] / sizes[BUILDER]:.3f} "
          f"({(sizes[BUILDER] - sizes[APP]) / 1e6:+.0f} MB saved)")


if __name__ == "__main__":
    main()
