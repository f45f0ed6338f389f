#!/bin/sh
# Runs as root inside the L1 guest of tests/test_vm_nested.py, from the `nested` image (QEMU, libvirt, hvctl's
# Python dependencies). hvctl's source and the `minimal` image for L2 arrive in /root/hvctl.tar.gz. hvctl then
# runs here, against L1's own libvirtd, exactly as an operator would on a GPU host: it binds L1's emulated edu
# device to vfio-pci and passes it to an L2 guest, whose console must list vendor 0x1234, device 0x11e8.
# Usage: nested_l1.sh MINIMAL_IMAGE_DIR_NAME EDU_ADDRESS. Prints one JSON object last.
set -eu
minimal=$1
edu=$2
mkdir -p /opt/hvctl/src
tar -C /opt/hvctl/src -xzf /root/hvctl.tar.gz
export PYTHONPATH=/opt/hvctl/src:/opt/hvctl/lib HVCTL_STATE_DIR=/var/lib/hvctl NO_COLOR=1 COLUMNS=200
hv() { python3 -m hvctl.cli "$@"; }
log() { echo "nested: $*" >&2; }

# libvirt without systemd or libvirt-daemon-system: cgroup v2 mounted by hand; the libvirt-qemu user and kvm group
# that Debian's libvirt is built to expect (it refuses to start without them), but QEMU runs as root, in the host's
# mount namespace.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
grep -q '^kvm:' /etc/group || echo 'kvm:x:64054:' >> /etc/group
grep -q '^libvirt-qemu:' /etc/group || echo 'libvirt-qemu:x:64055:' >> /etc/group
grep -q '^libvirt-qemu:' /etc/passwd || \
    echo 'libvirt-qemu:x:64055:64054:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >> /etc/passwd
mkdir -p /etc/libvirt /run/libvirt /var/log/libvirt /var/lib/libvirt
# L1's vIOMMU has no interrupt remapping (hvctl's <iommu> sets intremap='off'), and vfio_iommu_type1 then refuses
# to attach a group (EPERM) unless told to accept unsafe interrupts. A real GPU host must have interrupt remapping;
# this knob is for the test's emulated IOMMU only.
modprobe vfio_iommu_type1
echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
cat >> /etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
namespaces = [ ]
EOF
virtlogd -d
libvirtd -d
i=0
until virsh -c qemu:///system version >/dev/null 2>&1 || python3 -c 'import libvirt; libvirt.open("qemu:///system")' 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 180 ] || { log "libvirtd never answered"; exit 1; }; sleep 1
done
log "libvirtd up after ~${i}s"

mkdir -p "$HVCTL_STATE_DIR/images"
mv "/opt/hvctl/src/$minimal" "$HVCTL_STATE_DIR/images/"
# The manifest names the directory the image was built in, on L0.
python3 - "$HVCTL_STATE_DIR/images/$minimal" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); m = json.loads((d / "manifest.json").read_text()); m["directory"] = str(d)
(d / "manifest.json").write_text(json.dumps(m))
EOF
cat > "$HVCTL_STATE_DIR/policy.yaml" <<'EOF'
accelerators:
  edu: {vendor: 0x1234, device: 0x11e8}
hosts: {reserve: {memory_mib: 0}}
tenants:
  default: {quota: {vcpus: 2, memory_mib: 2048, disk_gib: 10, gpus: 1, vms: 2}}
EOF

hv host add local qemu:///system --json > /root/host.json
hv gpu list --json > /root/gpu-before.json
log "creating l2 with --gpus 1 --gpu-model edu"
hv create l2 --image minimal --memory 128 --gpus 1 --gpu-model edu --boot-timeout 1200 --json > /root/create.json
driver_during=$(basename "$(readlink "/sys/bus/pci/devices/$edu/driver")")
# Straight from the ledger, the console file and libvirt: each hvctl start costs ~40 s of imports under TCG.
python3 -c 'import json, sqlite3; db = sqlite3.connect("/var/lib/hvctl/ledger.sqlite3"); print(json.dumps([dict(zip(("address", "vm", "state"), r)) for r in db.execute("SELECT address, vm, state FROM gpu_bindings")]))' > /root/bindings.json
python3 -c 'import libvirt; print(libvirt.open("qemu:///system").lookupByName("l2").XMLDesc(0))' > /root/l2.xml
cp /var/lib/hvctl/vms/l2/console.log /root/l2-console.txt
hv destroy l2
driver_after=$(basename "$(readlink "/sys/bus/pci/devices/$edu/driver" 2>/dev/null)" 2>/dev/null || true)
python3 - "$driver_during" "$driver_after" "$edu" <<'EOF'
import json, sqlite3, sys
from pathlib import Path
during, after, edu = sys.argv[1:4]
print(json.dumps({
    "host": json.loads(Path("/root/host.json").read_text()),
    "gpu_before": json.loads(Path("/root/gpu-before.json").read_text()),
    "bindings_during": json.loads(Path("/root/bindings.json").read_text()),
    "bindings_after": [r[0] for r in sqlite3.connect("/var/lib/hvctl/ledger.sqlite3").execute(
        "SELECT address FROM gpu_bindings")],
    "create": json.loads(Path("/root/create.json").read_text()),
    "l2_xml": Path("/root/l2.xml").read_text(),
    "l2_console": Path("/root/l2-console.txt").read_text(),
    "driver_during": during, "driver_after": after or None,
    "override_after": Path(f"/sys/bus/pci/devices/{edu}/driver_override").read_text().strip(),
    "vfio_nodes_after": sorted(p.name for p in Path("/dev/vfio").iterdir() if p.name != "vfio"),
}))
EOF
