"""The container tests run only under ``make image-test`` / ``make compose-test``.

They are marked ``slow`` (so ``make test`` never collects them as runnable) and ``docker``; they
also skip unless ``DEQGUARD_DOCKER_TESTS=1`` (which those targets set), so that ``make test-all``
or ``make test-slow`` on a machine with a running engine does not start a multi-minute build.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs root and a Docker engine (make image-test)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if os.environ.get("DEQGUARD_DOCKER_TESTS") != "1":
        reason = "container tests run under make image-test / make compose-test only"
    elif shutil.which("docker") is None:
        reason = "no docker CLI"
    elif subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        reason = "no Docker engine answers"
    if reason:
        for item in items:
            if "docker" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
