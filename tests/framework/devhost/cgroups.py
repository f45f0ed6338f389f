"""A subtree of this machine's cgroups given to a remote-style host as its whole cgroup tree, as a container gets one.

libvirt places each domain's QEMU at ``/machine/qemu-ID-NAME.libvirt-qemu`` from the root of every hierarchy it
sees. Two daemons on one machine would therefore share ``/machine``, and collide when both run a domain of the same
name (a migration between them). A remote-style host gets its own tree instead: a cgroup ``hvctl-remote-N`` under
this process's own placement in each hierarchy; the host's holder process moves there and unshares a cgroup
namespace rooted at it, then mounts every hierarchy afresh inside its private mount namespace. There, libvirt sees
that subtree as ``/`` and makes its ``/machine`` inside it; every limit it sets on a domain is enforced by this
machine's kernel for that domain's QEMU alone, as on a real host.

Supported where the controllers libvirt uses live on cgroup v1 hierarchies (v1 or hybrid layouts). Under a pure
cgroup v2 tree, the subtree's root would have to hold processes and enable controllers for its children at once,
which v2 forbids without a delegated parent (systemd's ``Delegate=``): ``supported()`` then says why, and the host
runs with libvirt's cgroups off.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

# The v2 controllers libvirt sets a domain's limits with.
_LIBVIRT_V2_CONTROLLERS = {"cpu", "cpuset", "memory", "io"}


@dataclass(frozen=True)
class Hierarchy:
    mountpoint: Path  # where this machine mounts it: /sys/fs/cgroup/cpu
    fstype: str  # cgroup (v1) or cgroup2
    options: str  # the mount's super options that name the hierarchy: "cpu", "name=systemd"; "" for cgroup2
    placement: str  # this process's cgroup in it: "/" or "/some/slice"

    def path(self, name: str) -> Path:
        return self.mountpoint / self.placement.lstrip("/") / name


def hierarchies() -> list[Hierarchy]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup, with this process's placement in it."""
    placements: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        placements[controllers] = path  # "" is the v2 (unified) hierarchy
    found: list[Hierarchy] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _source, super_options = tail.split(" ")[:3]
        mountpoint = Path(fields.split(" ")[4])
        if fstype not in ("cgroup", "cgroup2") or mountpoint.parent != Path("/sys/fs/cgroup") and \
                mountpoint != Path("/sys/fs/cgroup"):
            continue
        options = ",".join(o for o in super_options.split(",") if o not in ("rw", "ro")) if fstype == "cgroup" \
            else ""
        key = options if fstype == "cgroup" else ""
        if key in placements:
            found.append(Hierarchy(mountpoint, fstype, options, placements[key]))
    return found


def supported() -> str | None:
    """None when a host can be given a cgroup tree of its own here; otherwise the reason it cannot."""
    found = hierarchies()
    if not any(h.fstype == "cgroup" for h in found):
        return "no cgroup v1 hierarchies (a pure cgroup v2 machine needs a delegated subtree)"
    for h in found:
        if h.fstype == "cgroup2":
            on_v2 = _LIBVIRT_V2_CONTROLLERS & set((h.path("") / "cgroup.controllers").read_text().split())
            if on_v2:
                return (f"{', '.join(sorted(on_v2))} on the cgroup v2 hierarchy (a v2 machine needs a delegated "
                        "subtree)")
    if not all(h.path("").is_dir() and (h.path("") / "cgroup.procs").exists() for h in found):
        return "this process's cgroups are not visible under /sys/fs/cgroup"
    return None


@dataclass(frozen=True)
class CgroupTree:
    name: str  # the subtree's name in every hierarchy: hvctl-remote-N

    def create(self) -> None:
        for h in hierarchies():
            path = h.path(self.name)
            path.mkdir(exist_ok=True)
            if "cpuset" in h.options.split(","):
                # A new v1 cpuset has no CPUs or memory nodes: nothing could run in it until they are given.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((path.parent / knob).read_text())

    def procs_files(self) -> list[str]:
        """Where a process writes its pid to move into the subtree, as this machine sees it."""
        return [str(h.path(self.name) / "cgroup.procs") for h in hierarchies()]

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run from a shell that first moves itself into the subtree in every hierarchy."""
        script = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
        return ["sh", "-c", script, "sh", *self.procs_files(), "--", *argv]

    def mount_lines(self) -> list[str]:
        """Shell lines for the holder, run inside its own mount and cgroup namespaces: /sys/fs/cgroup made anew, each
        hierarchy mounted there with the namespace's root (the subtree) as its root."""
        lines = ["mount -t tmpfs -o mode=0755,size=1m cgroup /sys/fs/cgroup"]
        for h in hierarchies():
            target = shlex.quote(str(h.mountpoint))
            if h.mountpoint != Path("/sys/fs/cgroup"):
                lines.append(f"mkdir -p {target}")
            if h.fstype == "cgroup2":
                lines.append(f"mount -t cgroup2 cgroup2 {target}")
            else:
                lines.append(f"mount -t cgroup -o {shlex.quote(h.options)} cgroup {target}")
        for link in Path("/sys/fs/cgroup").iterdir():
            if link.is_symlink():  # "cpu -> cpu,cpuacct" on many machines
                lines.append(f"ln -s {shlex.quote(str(link.readlink()))} {shlex.quote(str(link))}")
        return lines

    def processes(self) -> list[int]:
        """Every process in the subtree, as each hierarchy that has it lists them."""
        found: set[int] = set()
        for h in hierarchies():
            top = h.path(self.name)
            if top.is_dir():
                found |= {int(pid) for procs in top.rglob("cgroup.procs") for pid in procs.read_text().split()}
        return sorted(found)

    def remove(self, timeout: float = 15.0) -> None:
        """Every cgroup in the subtree, deepest first, once the processes in it have gone (the kernel lets an empty
        cgroup go a moment after its last process exits)."""
        deadline = time.monotonic() + timeout
        for h in hierarchies():
            top = h.path(self.name)
            if not top.is_dir():
                continue
            for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                               reverse=True) + [top]:
                while True:
                    try:
                        path.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
