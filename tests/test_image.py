"""The container image, built from the Dockerfile and run: ``.ci/image-smoke`` under pytest.

The script builds the image with podman (no Docker daemon, no registry) on a base made from
Debian's packages, runs it with ``--demo`` on a read-only root file system, scrapes
``/metrics``, runs the image's HEALTHCHECK inside it and checks the user; see the script's
header. It needs root, podman, runc and mmdebstrap (``.ci/run`` installs them) and about a
minute, so it runs only where ``CI`` is set; elsewhere it is skipped with the reason. The static
checks of the Dockerfile stay in ``test_docker.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.prom_support import REPO

SCRIPT = REPO / ".ci" / "image-smoke"
TOOLS = ("podman", "runc", "mmdebstrap")
SUMMARY = re.compile(r"^image-smoke: OK (?P<figures>.*)$", re.M)


def require_image_build() -> None:
    """Skip outside CI (with the reason); in CI, fail when something the build needs is missing."""
    if not os.environ.get("CI"):
        pytest.skip("builds and runs the container image (about a minute); set CI=1 to run it")
    problems = []
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append(
            f"{', '.join(missing)} not found (Debian: apt-get install {' '.join(TOOLS)})"
        )
    if os.geteuid() != 0:
        problems.append("not root (mmdebstrap --mode=root and podman build need it)")
    if problems:
        pytest.fail("; ".join(problems) + "; .ci/run provides them", pytrace=False)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_image_builds_and_runs_read_only_as_a_non_root_user() -> None:
    require_image_build()
    proc = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False, cwd=REPO
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = SUMMARY.search(proc.stdout)
    assert summary, output[-6000:]
    figures = dict(item.split("=", 1) for item in summary["figures"].split())
    assert figures["uid"] != "0"
    print(f"image-smoke: {summary['figures']}")


def test_ci_installs_what_the_image_build_needs() -> None:
    """``.ci/run`` starts on a fresh machine: it installs every tool the script needs."""
    run_script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    installs = re.search(r"apt-get install -y (.*)", run_script)
    assert installs, "no apt-get install line in .ci/run"
    assert set(TOOLS) <= set(installs.group(1).split()), installs.group(1)
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
