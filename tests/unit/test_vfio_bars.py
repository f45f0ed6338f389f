"""pcihole64 sizing for large-BAR GPUs (lxd#14380), from BAR layouts read out of fake sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakesysfs import H100_BARS, MEM32, MEM64, FakeBar, FakeHost

from vfio import PciDevice, PciSysfs, pcihole64_kib, required_mmio64_bytes
from vfio.bars import GiB, KiB, MiB, mmio64_layout_bytes, pow2_ceil

H200_BARS = (FakeBar(0, 16 << 20, MEM32), FakeBar(1, 256 << 30), FakeBar(3, 32 << 20))


def gpus(tmp_path: Path, *layouts: tuple[FakeBar, ...]) -> list[PciDevice]:
    host = FakeHost(tmp_path)
    addresses = [
        host.add_device(
            f"0000:{bus + 1:02x}:00.0",
            vendor=0x10DE,
            device=0x2330,
            class_code=0x030200,
            group=bus,
            bars=bars,
        )
        for bus, bars in enumerate(layouts)
    ]
    sysfs = PciSysfs(host.sys)
    return [sysfs.device(a) for a in addresses]


def is_pow2_gib(value: int) -> bool:
    return value % GiB == 0 and (value // GiB) & (value // GiB - 1) == 0


def test_h100_needs_256_gib(tmp_path: Path) -> None:
    devices = gpus(tmp_path, H100_BARS)
    needed = required_mmio64_bytes(devices)
    assert needed >= 128 * GiB + 32 * MiB and is_pow2_gib(needed)
    assert needed == 256 * GiB
    assert pcihole64_kib(devices) == 256 * GiB // KiB == 268435456


def test_h200_needs_512_gib(tmp_path: Path) -> None:
    devices = gpus(tmp_path, H200_BARS)
    assert mmio64_layout_bytes(devices) == 256 * GiB + 32 * MiB
    assert pcihole64_kib(devices) == 512 * GiB // KiB


def test_two_h100_cards_keep_each_bar1_aligned(tmp_path: Path) -> None:
    devices = gpus(tmp_path, H100_BARS, H100_BARS)
    # The second card's BAR1 must start on a 128 GiB boundary, so the layout ends at 384 GiB + 32 MiB.
    assert mmio64_layout_bytes(devices) == 384 * GiB + 32 * MiB
    assert pcihole64_kib(devices) == 512 * GiB // KiB


def test_only_64bit_prefetchable_bars_count(tmp_path: Path) -> None:
    layout = (FakeBar(0, 64 << 30, MEM64), FakeBar(2, 16 << 20, MEM32), FakeBar(4, 8 << 30))
    devices = gpus(tmp_path, layout)
    assert mmio64_layout_bytes(devices) == 8 * GiB


def test_small_bars_fit_the_default_window(tmp_path: Path) -> None:
    small = (FakeBar(0, 16 << 20, MEM32), FakeBar(1, 256 << 20), FakeBar(3, 32 << 20))
    rebar16 = (FakeBar(0, 16 << 20, MEM32), FakeBar(1, 16 << 30), FakeBar(3, 32 << 20))
    # 288 MiB of BARs plus 1 GiB of headroom rounds up to 2 GiB.
    assert required_mmio64_bytes(gpus(tmp_path / "a", small)) == 2 * GiB
    assert pcihole64_kib(gpus(tmp_path / "a2", small)) is None
    assert pcihole64_kib(gpus(tmp_path / "b", rebar16)) is None
    assert pcihole64_kib(gpus(tmp_path / "c", rebar16), default_window=GiB) == 32 * GiB // KiB


def test_no_64bit_bars_needs_nothing(tmp_path: Path) -> None:
    devices = gpus(tmp_path, (FakeBar(0, 16 << 20, MEM32),))
    assert required_mmio64_bytes(devices) == 0
    assert pcihole64_kib(devices) is None
    assert pcihole64_kib([]) is None


@pytest.mark.parametrize(("value", "expected"), [(0, 1), (1, 1), (2, 2), (3, 4), (129 * GiB, 256 * GiB)])
def test_pow2_ceil(value: int, expected: int) -> None:
    assert pow2_ceil(value) == expected
