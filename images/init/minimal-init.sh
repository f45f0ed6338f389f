#!/bin/busybox sh
# /init of hvctl's minimal guest. Everything it prints goes to the serial console, which hvctl reads.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/hvctl-modules); do insmod "/lib/modules/$m" 2>/dev/null; done

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }
name=$(arg hvctl.name)
[ -n "$name" ] && hostname "$name"

if grep -qw hvctl.probe /proc/cmdline; then
    # Accelerator probe: reaching this line proves the kernel booted under the accelerator being tried.
    echo "HVCTL-PROBE-OK"
    poweroff -f
fi

# A graceful shutdown from the host is an ACPI power-button press; busybox acpid runs CONFDIR/PWRF/00000080.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "HVCTL-POWEROFF"\numount /mnt 2>/dev/null\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null

mkdir -p /mnt
disk="none"
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /mnt 2>/dev/null; then
    disk="$(cat /mnt/hvctl-image 2>/dev/null)"
    # Writing proves the overlay is writable and really ours.
    echo "booted $(date +%s)" >> /mnt/boots
    sync
fi
# The PCI functions the guest sees, as "HVCTL-PCI ADDRESS VENDOR:DEVICE": proof of a passed-through device.
for d in /sys/bus/pci/devices/*; do
    echo "HVCTL-PCI ${d##*/} $(sed 's/^0x//' "$d/vendor"):$(sed 's/^0x//' "$d/device")"
done
echo "HVCTL-READY name=${name} kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo) disk=${disk}"

# A shell on the serial console for `hvctl console`, respawned when it exits. This test image holds nothing
# secret, and reaching its console already takes libvirt access to its host.
(while :; do setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'; sleep 1; done) &

# hvctl.tick=1 prints a counter every second: migration tests watch it continue on the destination.
tick=$(arg hvctl.tick)
hog=$(arg hvctl.hog)
if [ "$hog" = "1" ]; then
    echo "HVCTL-HOG started"
    while :; do :; done
fi
# hvctl.dirty=MB keeps rewriting MB of RAM: the memory-dirtying guest that migration tests and benchmarks need.
dirty=$(arg hvctl.dirty)
if [ -n "$dirty" ]; then
    mkdir -p /dirty
    mount -t tmpfs -o size=$((dirty + 8))m tmpfs /dirty
    echo "HVCTL-DIRTY ${dirty} MiB"
    # Non-zero data: QEMU sends all-zero pages as markers, which would make any guest look easy to migrate.
    while :; do yes hvctl-dirty | dd of=/dirty/buf bs=1M count="$dirty" iflag=fullblock conv=notrunc 2>/dev/null; done &
fi
n=0
while :; do
    if [ "$tick" = "1" ]; then echo "hvctl-tick $n"; n=$((n + 1)); fi
    sleep 1
done
