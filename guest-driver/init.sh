#!/bin/sh
# /init of the Lethe test guest (busybox ash; the console is ttyS0).
# Settings come from the kernel command line:
#   lethe.mib=N               memory workload size in MiB (0 or absent: none)
#   lethe.secret=S            the marker the workload plants in its pages
#   lethe.disk=write|verify   check files on /dev/vda (mounted at /mnt) first
#   lethe.interval=MS         pause between verification passes
#   lethe.probe=1             print LETHE-PROBE ok and power off (accelerator probe)
#   lethe.root=DEV            boot the system on DEV instead (the Debian guest): load
#                             the modules, mount DEV and hand over to its /sbin/init
# What the workload prints is listed in workload.c. When it exits, the guest powers
# off, so the host sees QEMU end rather than a silent guest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc

for word in $(cat /proc/cmdline); do
  case "$word" in
    lethe.mib=*) mib=${word#*=} ;;
    lethe.secret=*) secret=${word#*=} ;;
    lethe.disk=*) disk=${word#*=} ;;
    lethe.interval=*) interval=${word#*=} ;;
    lethe.probe=1) echo "LETHE-PROBE ok"; poweroff -f ;;
    lethe.root=*) root=${word#*=} ;;
  esac
done

mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || echo "LETHE-INIT insmod $m failed"
done
if [ -n "$root" ]; then
  mkdir -p /newroot
  if ! mount -t ext4 "$root" /newroot; then
    echo "LETHE-INIT cannot mount the root filesystem $root"
    poweroff -f
  fi
  for d in dev proc sys; do mount --move "/$d" "/newroot/$d"; done
  exec switch_root /newroot /sbin/init
fi
if [ -b /dev/vda ]; then
  mount -t ext4 /dev/vda /mnt || echo "LETHE-INIT cannot mount /dev/vda"
fi

# The hint channel is the virtio-serial port the host named org.lethe.hint.
for port in /sys/class/virtio-ports/*; do
  [ "$(cat "$port/name" 2>/dev/null)" = org.lethe.hint ] && hint=/dev/${port##*/}
done

# The guest driver owns the hint port (docs/guest-hints.md); it runs until poweroff.
if [ -n "$hint" ]; then
  /bin/lethe-guestd "$hint" &
fi

/bin/lethe-workload --mib "${mib:-0}" --interval-ms "${interval:-1000}" \
  ${secret:+--secret "$secret"} ${disk:+--disk "$disk" --disk-dir /mnt}
echo "LETHE-WORKLOAD-EXIT code=$?"
umount /mnt 2>/dev/null
poweroff -f
