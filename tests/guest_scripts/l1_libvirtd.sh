#!/bin/sh
# Runs as root inside the L1 guest of tests/functional/test_vm_remote_gpu.py, from the `nested` image (QEMU, libvirt). It makes L1
# a GPU host as an admin would: libvirtd running, VFIO usable. hvctl itself stays on the test machine and drives this
# libvirtd over qemu+ssh; nothing of hvctl is copied here.
set -eu
log() { echo "l1: $*" >&2; }

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
modprobe vfio-pci
cat >> /etc/libvirt/qemu.conf <<'CONF'
user = "root"
group = "root"
namespaces = [ ]
CONF
virtlogd -d
libvirtd -d
i=0
until python3 -c 'import libvirt; libvirt.open("qemu:///system")' 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 180 ] || { log "libvirtd never answered"; exit 1; }; sleep 1
done
log "libvirtd up after ~${i}s"
