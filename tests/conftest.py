"""Shared fixtures.

Unit tests use libvirt's real test driver and temporary SQLite files. Tests marked ``vm`` boot real TCG guests under a
private libvirtd that this session starts in its own mount namespace and stops at the end; they never touch the
machine's system daemon.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from framework.controller import (
    HVCTL,
    Controller,
    Daemons,
    RemoteFleet,
    TwoHosts,
    hvctl_cli,
    remote_fleet,
    remote_hosts,
    short_tempdir,
    two_local_hosts,
)
from framework.devhost import PrivateLibvirtd
from framework.pgserver import PgServer

from hvctl.context import Context
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.spec import VMSpec

REPO = Path(__file__).resolve().parent.parent
# What the test modules import from here: the framework's controller, and the VM fixtures below.
__all__ = ["HVCTL", "REPO", "Controller", "Daemons", "RemoteFleet", "TwoHosts", "hvctl_cli", "remote_fleet",
           "remote_hosts", "short_tempdir", "two_local_hosts"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.xml from the code")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL server for the session, started on first use (tests/pgserver.py)."""
    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's ledger lives, once on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


def _vm_prerequisites_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a private libvirtd"
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "unshare", "apt-get", "genisoimage",
                 "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[PrivateLibvirtd]:
    missing = _vm_prerequisites_missing()
    if missing:
        # Fail, not skip: `make test` promises these tests ran. CI installs everything they need.
        pytest.fail(f"VM tests cannot run: {missing}")
    with Daemons(short_tempdir("hvd-")) as daemons:
        yield daemons.start("d")


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Private libvirtds of a test's own, all stopped at its end (``Daemons.start``)."""
    with Daemons(short_tempdir("hvk-")) as started:
        yield started


@pytest.fixture(scope="session")
def image_dir(libvirtd: PrivateLibvirtd) -> Path:
    """Build the minimal image once per session; every test's state dir links to it."""
    from images.store import ImageStore

    root = Path(os.environ.get("HVCTL_TEST_IMAGES", "/var/tmp/hvctl-test-images"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    ImageStore(root).build("minimal")
    return root


@pytest.fixture(scope="session")
def stock_image(image_dir: Path) -> Path:
    """A stock-style Debian cloud image (GRUB for BIOS and UEFI, cloud-init), built from packages once per machine
    and cached beside the test images (its debootstrap tree too); hvctl is only ever handed the file."""
    from framework.devhost.stockimage import build

    stock = image_dir / ".cache" / "stock-debian-v2.qcow2"  # v2: boots with BIOS or UEFI
    if not stock.exists():
        build(stock.with_suffix(".partial"), image_dir / ".cache")
        stock.with_suffix(".partial").rename(stock)
    return stock


@pytest.fixture
def state_dir(image_dir: Path) -> Iterator[Path]:
    root = short_tempdir("hvs-")
    (root / "images").symlink_to(image_dir)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ctx(libvirtd: PrivateLibvirtd, state_dir: Path) -> Iterator[Context]:
    context = Context(state_dir=state_dir, uri=libvirtd.uri)
    yield context
    context.close()


@pytest.fixture
def make_vm(ctx: Context, request: pytest.FixtureRequest) -> Iterator[Callable[..., VMRecord]]:
    """VM factory: creates real guests and always destroys them; keeps a failed test's console logs."""
    made: list[str] = []

    def factory(name: str, boot_timeout: float = 90.0, **spec: object) -> VMRecord:
        made.append(name)
        return create(ctx, VMSpec.parse(name=name, memory_mib=128, **spec), options=BootOptions(timeout=boot_timeout))

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for name in made:
        console = ctx.paths.console_log(name)
        if failed and console.exists():
            keep = REPO / ".state" / "failed-consoles" / f"{request.node.name}-{name}.log"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(console, keep)
        # The VM may never have been created (tests of refused requests); the test itself reports why.
        with contextlib.suppress(Exception):
            destroy(ctx, name)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def run_hvctl(libvirtd: PrivateLibvirtd, state_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `hvctl` CLI in a subprocess against the private daemon and this test's state dir."""

    def run(*args: str, uri: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return hvctl_cli(state_dir, uri or libvirtd.uri, *args, timeout=timeout)

    return run


# -- the tiny LLM shared by the workload tests (built once per session; torch is imported only when asked for) -------


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer + random tiny Llama on disk (tests/unit/test_gpu_decode.py has its own: it runs without this
    file)."""
    from guest.workloads.assets import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> object:
    """The tiny LLM loaded on the CPU (a guest.workloads.llm.LoadedModel)."""
    import torch

    from guest.workloads.llm import load_model

    return load_model(tiny_dir, torch.device("cpu"))
