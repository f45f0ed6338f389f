"""The accelerator probe boots a kernel; it never trusts /dev/kvm's existence.

On the project's machines /dev/kvm exists but belongs to a nested PVM hypervisor that crashes a stock kernel, so both
probes must answer TCG there; on a host with working VT-x/AMD-V both must answer KVM. The test asserts that the two
independent probes (plain QEMU, and a transient domain through a libvirtd that can see /dev/kvm) agree, and that
the probe does succeed when the accelerator works (TCG always does), so it is not a check that can only say no.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Daemons
from framework.devhost import boots_under

from hvctl.domain import Accel
from hvctl.host import Host
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_probe_succeeds_when_the_accelerator_works(image_dir: Path) -> None:
    image = ImageStore(image_dir).get("minimal")
    assert boots_under("tcg", image.kernel, image.initrd, timeout=60)


def test_libvirt_probe_agrees_with_a_direct_boot(image_dir: Path, daemons: Daemons) -> None:
    image = ImageStore(image_dir).get("minimal")
    direct = Accel.KVM if boots_under("kvm", image.kernel, image.initrd) else Accel.TCG
    # This daemon sees /dev/kvm, so libvirt offers the kvm domain type and the probe has to really boot.
    daemon = daemons.start("k", timeout=120, hide_kvm=False)
    host = Host(daemon.uri)
    try:
        offered = "kvm" in host.facts().domain_types
        via_libvirt = host.probe_accelerator(image.kernel, image.initrd, daemon.root / "probe", timeout=20)
        assert via_libvirt is direct
        if not offered:
            assert via_libvirt is Accel.TCG
        # The transient probe domain is gone either way.
        assert host.domain_states() == {}
    finally:
        host.close()
