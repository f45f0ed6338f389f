#!/bin/sh
# PID 1 of hvctl's Debian guests. Reads the per-VM seed (a NoCloud "cidata" disk made by hvctl), starts the agent
# first and sshd second, then reaps orphans. Everything it prints goes to the serial console hvctl reads.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -o remount,rw /
# The controller waits on the agent, and under TCG Python needs seconds to import it: load only what the agent
# and the seed need, start the agent, and do everything else while it imports.
modprobe -a virtio_console isofs

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }

mkdir -p /run/hvctl/seed
if mount -t iso9660 -o ro /dev/vdb /run/hvctl/seed 2>/dev/null; then
    seed=/run/hvctl/seed/hvctl
    cp $seed/agent_token $seed/hostname $seed/authorized_keys $seed/ssh_host_ed25519_key \
        $seed/ssh_host_ed25519_key.pub /run/hvctl/
    [ -f $seed/net ] && cp $seed/net /run/hvctl/
    umount /run/hvctl/seed
else
    echo "HVCTL-SEED-MISSING: no cidata disk at /dev/vdb; no keys, no agent token"
fi
chmod 0600 /run/hvctl/agent_token /run/hvctl/ssh_host_ed25519_key 2>/dev/null

if [ "$(arg hvctl.agent)" != "0" ] && [ -s /run/hvctl/agent_token ]; then
    # -S: the agent needs nothing from site-packages; skipping site saves a little of a slow start.
    PYTHONPATH=/opt/hvctl/lib python3 -S -m guest.agent serve --port auto --token-file /run/hvctl/agent_token \
        --workdir /var/lib/hvctl-agent --allow-poweroff > /var/log/hvctl-agent.log 2>&1 &
fi

# localhost and the VM's own name resolve without DNS (debootstrap writes no /etc/hosts; torch's elastic launcher,
# for one, resolves "localhost" to pick free ports).
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
if [ -s /run/hvctl/hostname ]; then
    read -r name < /run/hvctl/hostname
    hostname "$name"
    echo "$name" > /etc/hostname
    printf '127.0.1.1\t%s\n' "$name" >> /etc/hosts
    mkdir -p -m 0700 /root/.ssh
    mv /run/hvctl/authorized_keys /root/.ssh/authorized_keys
    mv /run/hvctl/ssh_host_ed25519_key /run/hvctl/ssh_host_ed25519_key.pub /etc/ssh/
fi

modprobe -a $(cat /etc/hvctl-guest-modules)
ip link set lo up
# A production NIC (bridge or libvirt network), if the seed names one: "MAC ADDRESS|- GATEWAY|-".
prod_mac=- prod_addr=- prod_gw=-
# busybox udhcpc's event script, for a production NIC the seed gives no address: the lease's address, and no route
# (the default stays on the user-mode NIC unless the seed names a gateway).
cat > /run/hvctl/udhcpc.script <<'SCRIPT'
#!/bin/sh
case "$1" in
    deconfig) ip -4 addr flush dev "$interface" ;;
    bound) ip -4 addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
    renew) ip addr replace "$ip/$mask" dev "$interface" ;;
esac
SCRIPT
chmod 0755 /run/hvctl/udhcpc.script
[ -s /run/hvctl/net ] && read -r prod_mac prod_addr prod_gw < /run/hvctl/net
user_nic=
for dev in /sys/class/net/*; do
    [ -e "$dev/device" ] || continue
    nic=${dev##*/}
    if [ "$(cat "$dev/address")" = "$prod_mac" ]; then
        ip link set "$nic" up
        if [ "$prod_addr" != - ]; then
            ip addr add "$prod_addr" dev "$nic"
        else  # no address in the seed: the network's DHCP server's, renewed for as long as the VM runs
            busybox udhcpc -f -i "$nic" -s /run/hvctl/udhcpc.script > /var/log/udhcpc.log 2>&1 &
        fi
        continue
    fi
    # The first other NIC, whatever the slot made of its name: QEMU user-mode networking is always 10.0.2.0/24.
    [ -n "$user_nic" ] && continue
    user_nic=$nic
    ip link set "$nic" up
    ip addr add 10.0.2.15/24 dev "$nic"
    [ "$prod_gw" = - ] && ip route add default via 10.0.2.2 dev "$nic"
done
[ "$prod_gw" != - ] && ip route add default via "$prod_gw"

if [ -s /etc/ssh/ssh_host_ed25519_key ]; then
    mkdir -p /run/sshd
    /usr/sbin/sshd -E /var/log/sshd.log
fi

# A graceful shutdown from the host is an ACPI power-button press; busybox acpid runs CONFDIR/PWRF/00000080.
busybox acpid -c /etc/acpi -l /dev/null
# The overlay disk may be larger than the image's filesystem; grow it to fill the disk.
resize2fs /dev/vda > /dev/null 2>&1 &

echo "HVCTL-READY name=$(hostname) kernel=$(uname -r) cpus=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
trap 'busybox poweroff -f' USR2
while :; do
    wait
    sleep 1
done
