#!/bin/busybox sh
# Stage 1 of hvctl's Debian guests: load the disk driver, mount the root filesystem, hand over to its init.
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
for m in $(cat /etc/hvctl-modules); do insmod "/lib/modules/$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "HVCTL-STAGE1-FAILED: cannot mount /dev/vda"
    sleep 5
    poweroff -f
fi
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/hvctl-init
