"""Policy: flavors, tenants' quotas and weights, host reserves and overcommit, placement mode. YAML, checked by
pydantic, with every error reported by file, line and field so an admin can fix a policy without guessing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from guest.validation import problems
from hvctl import yamlfile
from hvctl.errors import InvalidSpec

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Amounts(Strict):
    vcpus: int = Field(default=0, ge=0)
    memory_mib: int = Field(default=0, ge=0)
    disk_gib: int = Field(default=0, ge=0)
    gpus: int = Field(default=0, ge=0)


class Flavor(Strict):
    vcpus: int = Field(ge=1, le=256)
    memory_mib: int = Field(ge=64)
    disk_gib: int = Field(ge=1)
    gpus: int = Field(default=0, ge=0, le=16)


class Quota(Amounts):
    vms: int = Field(default=0, ge=0)


class Tenant(Strict):
    weight: float = Field(default=1.0, gt=0)
    quota: Quota


class HostPolicy(Strict):
    cpu_overcommit: float = Field(default=1.0, ge=1.0, le=64)
    # Memory may be overcommitted only deliberately; GPUs never are (there is no setting for them).
    mem_overcommit: float = Field(default=1.0, ge=1.0, le=4)
    # Overlays are thin, so their virtual sizes may add up past the storage they live on, but only deliberately:
    # a full filesystem pauses every VM on it.
    disk_overcommit: float = Field(default=1.0, ge=1.0, le=16)
    reserve: Amounts = Amounts()


class Placement(Strict):
    mode: Literal["pack", "spread"] = "pack"
    default_duration_s: float = Field(default=3600, gt=0)


class Accelerator(Strict):
    """A PCI device passed through as a GPU although its class is not a display class (an NPU, say, or QEMU's
    edu device in the remote GPU test), or a GPU given a model name and facts. Its name is a model for
    `hvctl create --gpu-model`."""

    vendor: int = Field(ge=0, le=0xFFFF)
    device: int = Field(ge=0, le=0xFFFF)
    # The card's 64-bit prefetchable BAR space, in GiB (an H100's is 128): what the guest's 64-bit PCI hole is
    # sized from on a remote host, whose BAR sizes libvirt does not report. Unset there: QEMU's default hole.
    mmio64_gib: int | None = Field(default=None, ge=1, le=4096)


class Policy(Strict):
    placement: Placement = Placement()
    accelerators: dict[Name, Accelerator] = {}
    hosts: HostPolicy = HostPolicy()
    flavors: dict[Name, Flavor] = {}
    tenants: dict[Name, Tenant] = Field(min_length=1)

    def gpu_model(self, vendor: int, device: int) -> str:
        """A GPU's model, as `--gpu-model` and the scheduler name it: the policy's name for its vendor:device,
        else the ids themselves ("10de:2330")."""
        for name, accelerator in self.accelerators.items():
            if (accelerator.vendor, accelerator.device) == (vendor, device):
                return name
        return f"{vendor:04x}:{device:04x}"

    def accelerator(self, vendor: int, device: int) -> Accelerator | None:
        """The policy's entry for a vendor:device, if it names one."""
        return next((a for a in self.accelerators.values() if (a.vendor, a.device) == (vendor, device)), None)

    def sizes(self, flavor: str | None = None, *, vcpus: int | None = None, memory_mib: int | None = None,
              disk_gib: int | None = None, gpus: int | None = None) -> dict[str, Any]:
        """A request's sizes as VMSpec takes them: the flavor's (without one: 1 vCPU, 256 MiB, 1 GiB, no GPU), each
        overridden by a value given explicitly. `hvctl create` and `hvctl plan` both size requests here."""
        base = self.flavor(flavor) if flavor is not None else Flavor(vcpus=1, memory_mib=256, disk_gib=1)
        return {"vcpus": vcpus if vcpus is not None else base.vcpus,
                "memory_mib": memory_mib if memory_mib is not None else base.memory_mib,
                "disk_gib": disk_gib if disk_gib is not None else base.disk_gib,
                "gpus": {"count": gpus if gpus is not None else base.gpus}}

    def tenant(self, name: str) -> Tenant:
        if name not in self.tenants:
            raise InvalidSpec(f"unknown tenant {name!r}; the policy defines: {', '.join(sorted(self.tenants))}")
        return self.tenants[name]

    def flavor(self, name: str) -> Flavor:
        if name not in self.flavors:
            raise InvalidSpec(f"unknown flavor {name!r}; the policy defines: {', '.join(sorted(self.flavors))}")
        return self.flavors[name]


class PolicyError(InvalidSpec):
    """Every problem in a policy file, one per line, each as FILE:LINE: FIELD: MESSAGE."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
        self.problems = problems


def load_policy(path: Path | None) -> Policy:
    path = path or SHIPPED / "default.yaml"
    try:
        text = yamlfile.read_text(path)
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: not UTF-8 text"]) from None
    return parse_policy(text, str(path))


def parse_policy(text: str, where: str) -> Policy:
    try:
        tree = yamlfile.compose(text)
        data = yamlfile.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PolicyError([f"{where}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise PolicyError([f"{where}:1: the policy must be a mapping with tenants, flavors, hosts, placement"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError([f"{where}:{_line_of(tree, list(p.loc))}: {p if p.loc else f'policy: {p.rule}'}"
                           for p in problems(exc)]) from None


def _line_of(node: Any, path: list[str]) -> int:
    """The line of the deepest YAML node along ``path`` (a missing key points at its parent mapping)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                return line
            node = match
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
        else:
            return line
        line = node.start_mark.line + 1
    return line
