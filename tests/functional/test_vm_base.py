"""The Debian `base` image under real TCG: agent RPC from inside the guest, tenant SSH with pinned host keys,
exec exit codes, file copies, network isolation, and the faults around them.

One VM serves the read-only checks (booting a Debian guest under TCG costs ~20 s); tests that break a VM make
their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Controller, short_tempdir
from framework.devhost import PrivateLibvirtd

from guest import rpc
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.errors import GuestTimeout
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.seed import generate_ed25519
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

TENANTS_POLICY = """\
tenants:
  default: {quota: {vcpus: 8, memory_mib: 8192, disk_gib: 100, vms: 10}}
  acme: {quota: {vcpus: 4, memory_mib: 4096, disk_gib: 50, vms: 4}}
  globex: {quota: {vcpus: 4, memory_mib: 4096, disk_gib: 50, vms: 4}}
"""


def write_keypair(directory: Path, name: str) -> tuple[Path, str]:
    pair = generate_ed25519(name)
    private = directory / name
    private.write_bytes(pair.private_openssh)
    private.chmod(0o600)
    return private, pair.public_line


@dataclass
class KeyedEnv:
    """A controller with tenants acme and globex, each with a key pair of its own, and acme's VM deb."""

    controller: Controller
    vm: VMRecord
    acme: Path  # private keys
    globex: Path

    @property
    def ctx(self) -> Context:
        return self.controller.ctx


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[KeyedEnv]:
    ImageStore(image_dir).build("base")
    # The tenants whose keys this module uses; the shipped default policy only knows "default".
    controller = Controller.open(short_tempdir("hvb-"), libvirtd.uri, image_dir, policy=TENANTS_POLICY)
    keys = short_tempdir("hvk-")
    try:
        acme_key, acme_pub = write_keypair(keys, "acme")
        globex_key, globex_pub = write_keypair(keys, "globex")
        controller.ctx.ledger.keys.add("acme", acme_pub)
        controller.ctx.ledger.keys.add("globex", globex_pub)
        record = create(controller.ctx, VMSpec.parse(name="deb", tenant="acme", memory_mib=512, disk_gib=2,
                                                     image="base"), options=BootOptions(timeout=180))
        yield KeyedEnv(controller, record, acme_key, globex_key)
    finally:
        controller.close()
        shutil.rmtree(keys, ignore_errors=True)


def hvctl(env: KeyedEnv, *args: str, timeout: float = 120,
          crash_after: str | None = None) -> subprocess.CompletedProcess[str]:
    return env.controller.hvctl(*args, timeout=timeout, crash_after=crash_after)


def agent_of(env: KeyedEnv, record: VMRecord) -> AgentClient:
    """The agent through the host's libvirt connection (openChannel), as hvctl reaches it."""
    ctx = env.ctx
    assert record.agent_token
    return ctx.agent(record.host, record.name, record.agent_token)


def test_agent_ping_and_info_come_from_inside_the_guest(env: KeyedEnv, image_dir: Path) -> None:
    info = json.loads(hvctl(env, "agent", "deb", "info", "--json").stdout)
    image = ImageStore(image_dir).get("base")
    assert info["hostname"] == "deb" and info["kernel"] == image.kernel_version
    assert info["python"].startswith("3.11.") and "pydantic" in info["packages"]
    assert 400 <= info["memory_mib"] <= 512 and info["cpus"] == 1
    ping = json.loads(hvctl(env, "agent", "deb", "ping", "--json").stdout)
    assert ping["pong"] is True and ping["uptime_s"] > 0


def test_exec_returns_the_guest_kernel_and_propagates_exit_codes(env: KeyedEnv, image_dir: Path) -> None:
    kernel = ImageStore(image_dir).get("base").kernel_version
    uname = hvctl(env, "exec", "deb", "--", "uname", "-r")
    assert uname.returncode == 0 and uname.stdout.strip() == kernel
    failing = hvctl(env, "exec", "deb", "--", "sh", "-c", "echo oops >&2; exit 7")
    assert failing.returncode == 7 and "oops" in failing.stderr
    # The command ran in the guest, not here: its hostname is the VM's.
    assert hvctl(env, "exec", "deb", "--", "hostname").stdout.strip() == "deb"


def test_tenant_key_opens_its_own_vm_and_another_tenants_key_is_refused(env: KeyedEnv) -> None:
    own = hvctl(env, "exec", "deb", "-i", str(env.acme), "--", "cat", "/etc/hvctl-image")
    assert own.returncode == 0 and own.stdout.startswith("base@")
    other = hvctl(env, "exec", "deb", "-i", str(env.globex), "--", "true")
    assert other.returncode == 11 and "refused the key" in other.stderr and "Traceback" not in other.stderr


def test_a_host_key_that_does_not_match_is_refused_loudly(env: KeyedEnv) -> None:
    ctx, vm = env.ctx, env.vm
    assert vm.host_pubkey
    impostor = generate_ed25519("impostor").public_line
    ctx.ledger.vms.set_host_pubkey("deb", impostor)
    try:
        result = hvctl(env, "exec", "deb", "--", "true")
        assert result.returncode == 12 and "HOST KEY MISMATCH" in result.stderr
    finally:
        ctx.ledger.vms.set_host_pubkey("deb", vm.host_pubkey)
    assert hvctl(env, "exec", "deb", "--", "true").returncode == 0


def test_key_rm_revokes_a_key_in_running_vms_and_their_seeds(env: KeyedEnv, tmp_path: Path) -> None:
    """A VM made with --no-operator-key opens to its tenant's keys only, and its agent still answers. Then `key rm`
    takes one of those keys away: the running guest refuses it at once, the seed no longer carries it, and the VM
    keeps its own host key."""
    from hvctl.seed import read_seed_file

    ctx = env.ctx
    spare_key, spare_pub = write_keypair(tmp_path, "acme-spare")
    (tmp_path / "acme-spare.pub").write_text(spare_pub + "\n")
    assert hvctl(env, "key", "add", "acme", str(tmp_path / "acme-spare.pub")).returncode == 0
    made = hvctl(env, "create", "nokey", "--tenant", "acme", "--image", "base", "--memory", "512", "--disk", "2",
                 "--no-operator-key", "--boot-timeout", "180", timeout=300)
    assert made.returncode == 0, made.stderr
    try:
        assert hvctl(env, "exec", "nokey", "-i", str(spare_key), "--", "true").returncode == 0
        # Over SSH the operator's key is refused; plain exec, with no SSH path for hvctl, goes through the agent.
        as_operator = hvctl(env, "exec", "nokey", "--via", "ssh", "--", "true")
        assert as_operator.returncode == 11 and "refused the key" in as_operator.stderr
        via_agent = hvctl(env, "exec", "nokey", "--", "sh", "-c", "echo ${SSH_CONNECTION:-agent}")
        assert via_agent.returncode == 0 and via_agent.stdout.strip() == "agent"
        assert json.loads(hvctl(env, "agent", "nokey", "ping", "--json").stdout)["pong"] is True
        refused = hvctl(env, "checkpoint", "nokey")
        assert refused.returncode == 2 and "--no-operator-key" in refused.stderr

        removed = hvctl(env, "key", "rm", "acme", str(tmp_path / "acme-spare.pub"), "--json")
        assert removed.returncode == 0, removed.stderr
        outcome = {vm["vm"]: vm for vm in json.loads(removed.stdout)["vms"]}
        assert outcome["nokey"] == {"vm": "nokey", "seed": True, "live": True, "problem": None}
        gone = hvctl(env, "exec", "nokey", "-i", str(spare_key), "--", "true")
        assert gone.returncode == 11 and "refused the key" in gone.stderr
        assert hvctl(env, "exec", "nokey", "-i", str(env.acme), "--", "true").returncode == 0
        record = ctx.ledger.vms.get("nokey")
        assert record.seed is not None
        seeded = read_seed_file(record.seed, "hvctl/authorized_keys").decode()
        assert spare_pub not in seeded and seeded.count("ssh-ed25519") == 1
        assert record.host_pubkey and read_seed_file(record.seed, "hvctl/ssh_host_ed25519_key.pub").decode().strip() \
            == record.host_pubkey
        old_token = record.agent_token
        rotated = hvctl(env, "agent", "nokey", "rotate-token", "--json")
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout) == {"vm": "nokey", "rotated": True, "live": True}
        new_token = ctx.ledger.vms.get("nokey").agent_token
        assert new_token and new_token != old_token
        assert read_seed_file(record.seed, "hvctl/agent_token").decode().strip() == new_token
        with pytest.raises(AgentError, match="bad or missing agent token"):
            ctx.agent(record.host, record.name, str(old_token)).call("ping")
        # A rotation killed right after each step (the crash hook), then `doctor --repair`: before the guest got the
        # new token nothing changes; after, the guest is asked with the token the intent recorded, and the ledger
        # and the seed take it. Either way the agent answers to the ledger's token and the seed agrees.
        for step, outcome in (("chosen", "the guest kept its old token: nothing to mend"),
                              ("switched", "the guest holds the new token: the ledger and the seed have it too"),
                              ("recorded", "the guest holds the new token: the ledger and the seed have it too")):
            before = ctx.ledger.vms.get("nokey").agent_token
            killed = hvctl(env, "agent", "nokey", "rotate-token", crash_after=f"rotate-token.{step}")
            assert killed.returncode == -9, (step, killed.stderr)
            repaired = hvctl(env, "doctor", "--repair", "--json")
            (done,) = json.loads(repaired.stdout)["repaired"]["operations"]
            assert done["outcome"] == outcome, (step, done)
            now = ctx.ledger.vms.get("nokey").agent_token
            assert (now == before) is (step == "chosen"), step
            assert json.loads(hvctl(env, "agent", "nokey", "ping", "--json").stdout)["pong"] is True, step
            assert read_seed_file(record.seed, "hvctl/agent_token").decode().strip() == now, step
            assert ctx.ledger.operations.all() == []
        # Across a reboot (the guest reads its seed again): the new token holds, the revoked key stays revoked.
        assert hvctl(env, "stop", "nokey", "--timeout", "60").returncode == 0
        assert hvctl(env, "start", "nokey", timeout=300).returncode == 0
        assert json.loads(hvctl(env, "agent", "nokey", "ping", "--json").stdout)["pong"] is True
        gone = hvctl(env, "exec", "nokey", "-i", str(spare_key), "--", "true")
        assert gone.returncode == 11 and "refused the key" in gone.stderr
        again = hvctl(env, "key", "rm", "acme", str(tmp_path / "acme-spare.pub"))
        assert again.returncode != 0 and "not authorised for tenant acme" in again.stderr
    finally:
        hvctl(env, "destroy", "nokey")


def test_cp_in_and_out(env: KeyedEnv, tmp_path: Path) -> None:
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(200_000))
    assert hvctl(env, "cp", str(payload), "deb:/root/in.bin").returncode == 0
    digest = hvctl(env, "exec", "deb", "--", "sha256sum", "/root/in.bin").stdout.split()[0]
    assert digest == hashlib.sha256(payload.read_bytes()).hexdigest()
    back = tmp_path / "out.bin"
    assert hvctl(env, "cp", "deb:/root/in.bin", str(back)).returncode == 0
    assert back.read_bytes() == payload.read_bytes()
    missing = hvctl(env, "cp", "deb:/no/such/file", str(tmp_path / "x"))
    assert missing.returncode == 11 and "no such file" in missing.stderr


def test_a_guest_cannot_reach_host_ports_nor_other_vms_forwards(env: KeyedEnv) -> None:
    """Every VM's SSH forward is a port on the host's loopback. A listener there stands in for another VM's forward:
    the guest's user-mode network is restricted, so it must not get through."""
    vm = env.vm
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        probe = (f"import socket\ntry:\n socket.create_connection(('10.0.2.2', {port}), timeout=3)\n print('open')\n"
                 "except OSError as e:\n print('blocked', e)\n")
        out = agent_of(env, vm).typed("exec", rpc.ExecResult,
                                      rpc.ExecParams(argv=["python3", "-c", probe], timeout_s=60))
        assert out.stdout.startswith("blocked"), out.stdout


def test_agent_refuses_calls_without_the_seed_token(env: KeyedEnv) -> None:
    vm = env.vm
    ctx = env.ctx
    with pytest.raises(Exception, match="bad or missing agent token"):
        ctx.agent(vm.host, vm.name, "not-the-token").call("ping")
    # A malformed line straight into QEMU's end of the channel gets an error reply, and the agent keeps serving.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(vm.agent_socket))
        s.sendall(b"\n{not json\n")
        reply = b""
        while b"\n" not in reply:
            reply += s.recv(4096)
    assert json.loads(reply.splitlines()[0])["error"]["code"] == "malformed"
    assert agent_of(env, vm).typed("ping", rpc.PingResult).pong


def test_agent_that_never_answers_times_out_with_console_and_is_cleaned_up(env: KeyedEnv) -> None:
    ctx = env.ctx
    spec = VMSpec.parse(name="mute-agent", memory_mib=512, disk_gib=2, image="base")
    with pytest.raises(GuestTimeout, match="agent of mute-agent never answered") as exc:
        # hvctl.agent=0 boots the guest without starting its agent (an admin debugging switch).
        create(ctx, spec, options=BootOptions(timeout=60, extra_cmdline=("hvctl.agent=0",)))
    assert "HVCTL-READY name=mute-agent" in exc.value.console_tail
    assert ctx.host().state("mute-agent") is DomainState.MISSING
    assert not ctx.paths.vm_dir("mute-agent").exists()
    assert "mute-agent" not in {r.name for r in ctx.ledger.vms.all()}


def test_guest_shutdown_via_agent_is_noticed_then_destroy_removes_everything(env: KeyedEnv) -> None:
    ctx, vm = env.ctx, env.vm
    assert agent_of(env, vm).typed("shutdown", rpc.ShutdownResult).accepted
    deadline = time.monotonic() + 60
    while ctx.host().state("deb") is not DomainState.SHUTOFF and time.monotonic() < deadline:
        time.sleep(0.5)
    listing = json.loads(hvctl(env, "list", "--json").stdout)
    (row,) = [v for v in listing["vms"] if v["name"] == "deb"]
    assert row["actual"] == "shutoff" and "powered off" in row["drift"]
    assert hvctl(env, "destroy", "deb").returncode == 0
    assert ctx.host().state("deb") is DomainState.MISSING
    assert not vm.overlay.exists() and vm.seed is not None and not vm.seed.exists()
    assert not ctx.paths.vm_dir("deb").exists()
    assert ctx.ledger.vms.all() == []



def test_a_vm_on_a_host_bridge_answers_ssh_at_its_own_address(env: KeyedEnv) -> None:
    """`create --bridge BR --ip ADDR`: the test makes an isolated bridge of its own (no uplink, an address from
    198.18.0.0/15, the range set aside for lab networks), so the traffic never leaves this machine. The tenant
    reaches the guest on port 22 of that address, the host key still pinned."""
    ctx = env.ctx
    bridge = f"hvbr{secrets.token_hex(3)}"
    missing = hvctl(env, "create", "nobridge", "--image", "base", "--bridge", bridge, "--ip", "198.18.77.10/24")
    assert missing.returncode == 2 and f"there is no bridge '{bridge}'" in missing.stderr
    assert not ctx.paths.vm_dir("nobridge").exists()
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "198.18.77.1/24", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        created = hvctl(env, "create", "bridged", "--tenant", "acme", "--image", "base", "--memory", "512", "--disk",
                        "2", "--bridge", bridge, "--ip", "198.18.77.10/24", "--boot-timeout", "180", timeout=240)
        assert created.returncode == 0, created.stderr
        shown = hvctl(env, "exec", "bridged", "--direct", "-i", str(env.acme), "--", "sh", "-c",
                      "ip -4 -o addr show; cat /proc/net/route")
        assert shown.returncode == 0, shown.stderr
        assert "198.18.77.10/24" in shown.stdout and "10.0.2.15/24" in shown.stdout
        # The other tenant's key is refused on the bridge address too.
        refused = hvctl(env, "exec", "bridged", "--direct", "-i", str(env.globex), "--", "true")
        assert refused.returncode != 0 and "refused the key" in refused.stderr
        assert hvctl(env, "destroy", "bridged").returncode == 0
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)
