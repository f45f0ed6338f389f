"""A remote-style host reached over qemu+tls (framework.devhost.remote with tls=True: certificates made by openssl
for the test, the client's in its pkipath), as an admin registers one that `hvctl host prepare --tls` set up.

Marked `vm`: it starts real daemons as root and boots a guest."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import remote_fleet

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_a_vm_is_created_and_destroyed_over_qemu_tls_and_a_foreign_ca_is_refused(image_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """The same host reached over qemu+tls (certificates made by openssl for the test, the client's in pkipath):
    the minimal image is uploaded into its pool, boots, is ready on its console, and destroy leaves nothing. A
    client that trusts another CA is refused in one line, and nothing is registered."""
    with remote_fleet(image_dir, {"far": 43}, cli_timeout=120, tls=True) as fleet:
        host = fleet.hosts["far"]
        foreign = tmp_path / "pki"
        shutil.copytree(host.root / "controller" / "pki", foreign)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                        "-out", str(foreign / "cacert.pem"), "-days", "1", "-subj", "/O=other/CN=other CA"],
                       check=True, capture_output=True)
        refused = fleet.hvctl("host", "add", "bad", host.tls_uri.replace(str(host.root / "controller" / "pki"),
                                                                         str(foreign)))
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 5 and last.startswith("hvctl: error: cannot reach libvirt at qemu+tls://"), \
            refused.stderr
        assert "Traceback" not in refused.stderr
        assert "bad" not in {h["name"] for h in json.loads(fleet.hvctl("host", "list", "--json").stdout)}

        added = fleet.hvctl("host", "add", "tls1", host.tls_uri)
        assert added.returncode == 0, added.stderr
        made = fleet.hvctl("create", "rt1", "--host", "tls1", "--image", "minimal", "--memory", "256", "--disk",
                           "1", "--boot-timeout", "240", "--json", timeout=300)
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["image_upload"]["bytes"] > 0
        assert {"vm-rt1.qcow2", "vm-rt1.seed.iso"} <= set(host.pool_listing())
        console = fleet.hvctl("console-log", "rt1")
        assert console.returncode == 0 and "HVCTL-READY name=rt1" in console.stdout
        gone = fleet.hvctl("destroy", "rt1")
        assert gone.returncode == 0, gone.stderr
        assert not [f for f in host.pool_listing() if f.startswith("vm-")]
