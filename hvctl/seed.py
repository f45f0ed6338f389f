"""Per-VM seeds: a NoCloud "cidata" ISO with the hostname, authorized keys, the VM's SSH host key and agent token.

hvctl generates the host key itself, so the controller knows the guest's public key before the guest ever boots and
can verify it on the very first connection: no trust on first use. Stock cloud images read the same seed through
cloud-init (meta-data, user-data); hvctl's own images read the plain files under hvctl/ from their init, which is
much faster than running cloud-init under TCG.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hvctl.console import READY_MARKER
from hvctl.errors import HvctlError
from hvctl.paths import replace_atomically
from hvctl.spec import NetworkAttach


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_line: str


def generate_ed25519(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return KeyPair(private, f"{public.decode()} {comment}")


def operator_key(keys_dir: Path) -> Path:
    """The controller's own SSH key, authorised on every VM so that admins' `hvctl exec` works; made on first use."""
    path = keys_dir / "operator_ed25519"
    if path.exists():
        return path
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Two commands may make their first VM at once: one makes the key, under a lock, and the other uses it. The
    # public half is in place before the private one appears, so whoever sees the key sees both halves whole.
    with open(keys_dir / ".operator.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            pair = generate_ed25519("hvctl-operator")
            public = path.with_suffix(".pub")
            replace_atomically(public, (pair.public_line + "\n").encode(), 0o644)
            replace_atomically(path, pair.private_openssh, 0o600)
    return path


def public_key_of(private_key: Path) -> str:
    return private_key.with_suffix(".pub").read_text().strip()


def new_agent_token() -> str:
    return secrets.token_urlsafe(32)


# QEMU's default MAC for the first NIC it creates from the command line: hvctl's user-mode NIC.
USER_NIC_MAC = "52:54:00:12:34:56"


def network_config(mac: str, attach: NetworkAttach) -> dict[str, object]:
    """cloud-init network-config v2: the user-mode NIC by DHCP (QEMU's slirp answers), the production NIC static or
    by DHCP, both found by MAC. On hvctl's tenant network by DHCP: the network's server gives the VM's MAC the
    address the ledger holds for it (``hvctl.host.networks``)."""
    production: dict[str, object] = {"match": {"macaddress": mac}}
    if attach.address is not None and attach.tenant_network is None:
        production["addresses"] = [str(attach.address)]
    else:
        production["dhcp4"] = True
    if attach.gateway is not None:
        production["routes"] = [{"to": "default", "via": str(attach.gateway)}]
    user: dict[str, object] = {"match": {"macaddress": USER_NIC_MAC}, "dhcp4": True}
    if attach.gateway is not None:
        user["dhcp4-overrides"] = {"use-routes": False}
    return {"version": 2, "ethernets": {"user0": user, "prod0": production}}


def build_seed(out: Path, hostname: str, authorized_keys: list[str], host_key: KeyPair, agent_token: str,
               nic: tuple[str, NetworkAttach] | None = None, instance_id: str | None = None) -> None:
    """The NoCloud seed. ``nic``: the production NIC's MAC and settings, as cloud-init network-config v2 (for stock
    images) and as hvctl/net, "MAC ADDRESS|- GATEWAY|-", for hvctl's own init. ``instance_id``: kept when a seed is
    rewritten, so that cloud-init does not take the next boot for a new instance's first."""
    instance_id = instance_id or f"hvctl-{hostname}-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="hvctl-seed-") as tmp:
        root = Path(tmp)
        (root / "meta-data").write_text(json.dumps({"instance-id": instance_id,
                                                    "local-hostname": hostname}) + "\n")
        user_data = {
            "hostname": hostname,
            "disable_root": False,
            "ssh_pwauth": False,
            "ssh_authorized_keys": authorized_keys,
            "ssh_deletekeys": True,
            "ssh_keys": {"ed25519_private": host_key.private_openssh.decode(), "ed25519_public": host_key.public_line},
            # Only the key hvctl pinned: no other host key types for a client to be offered instead.
            "ssh_genkeytypes": [],
            # cloud-final prints this on the console (journal+console) once the instance is configured: the stock
            # image's readiness line, as hvctl's own init prints its marker.
            "final_message": f"{READY_MARKER} name={hostname} cloud-init finished after $UPTIME s",
        }
        # JSON is valid YAML, which is what cloud-init parses after the #cloud-config header.
        (root / "user-data").write_text("#cloud-config\n" + json.dumps(user_data, indent=1) + "\n")
        ours = root / "hvctl"
        ours.mkdir()
        (ours / "hostname").write_text(hostname + "\n")
        (ours / "authorized_keys").write_text("".join(k + "\n" for k in authorized_keys))
        (ours / "ssh_host_ed25519_key").write_bytes(host_key.private_openssh)
        (ours / "ssh_host_ed25519_key.pub").write_text(host_key.public_line + "\n")
        (ours / "agent_token").write_text(agent_token + "\n")
        if nic is not None:
            mac, attach = nic
            (ours / "net").write_text(f"{mac} {attach.address or '-'} {attach.gateway or '-'}\n")
            (root / "network-config").write_text(json.dumps(network_config(mac, attach), indent=1) + "\n")
        tool = shutil.which("genisoimage") or shutil.which("mkisofs")
        if tool is None:
            raise HvctlError("genisoimage is not installed", hint="apt-get install genisoimage")
        # umask 027: the ISO is born 0640, never readable by others even for an instant (it holds the VM's SSH
        # host private key and its agent token).
        result = subprocess.run([tool, "-quiet", "-output", str(out), "-volid", "cidata", "-joliet", "-rock",
                                 str(root)], capture_output=True, text=True, umask=0o027)
        if result.returncode != 0:
            raise HvctlError(f"cannot build the seed ISO: {result.stderr.strip()}")
    os.chmod(out, 0o640)  # had ``out`` existed, genisoimage kept its mode


def read_seed_file(seed: Path, name: str) -> bytes:
    """One file of a seed ISO hvctl made, by its Rock Ridge path (``hvctl/agent_token``)."""
    result = subprocess.run(["isoinfo", "-R", "-i", str(seed), "-x", f"/{name}"], capture_output=True)
    if result.returncode != 0 or not result.stdout:
        raise HvctlError(f"cannot read {name} from the seed {seed}: "
                         f"{result.stderr.decode(errors='replace').strip() or 'no such file'}")
    return result.stdout


def rewrite_seed(seed: Path, hostname: str, authorized_keys: list[str], host_public_line: str, agent_token: str,
                 nic: tuple[str, NetworkAttach] | None = None) -> None:
    """Replace a VM's seed with one that differs in its keys or token, for its next boot. The VM's own host key
    (which the controller does not keep) and cloud-init's instance-id come from the seed being replaced; the new
    one is built beside it and renamed over it, so a crash leaves one or the other whole."""
    private = read_seed_file(seed, "hvctl/ssh_host_ed25519_key")
    instance_id = json.loads(read_seed_file(seed, "meta-data"))["instance-id"]
    fresh = seed.with_name(f".{seed.name}.new")
    fresh.unlink(missing_ok=True)
    try:
        build_seed(fresh, hostname, authorized_keys, KeyPair(private, host_public_line), agent_token, nic,
                   instance_id=instance_id)
        os.replace(fresh, seed)
    finally:
        fresh.unlink(missing_ok=True)
