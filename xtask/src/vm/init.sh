#!/bin/busybox sh
# /init of the VM test guest (busybox initramfs built by `cargo xtask vm-test`).
#
# Kernel command line parameters (one image serves every test):
#   kva.agent=T1,T2  the agent's transports, one --transport each
#                    (default: virtio-serial)
#   kva.late=M1,M2   modules loaded after the agent started, so that their
#                    devices appear while it runs (default: virtio_console)
#   kva.late_after=N seconds between starting the agent and loading them (default: 1)
#   kva.log=LEVEL    the agent's log level (default: info)
#   kva.config=NAME  start the agent with --config /etc/kva/NAME.toml, one of
#                    the configurations baked into the initramfs (see
#                    xtask/src/vm/configs/); default: none (built-in defaults)
#   kva.tmp_mib=N    mount a tmpfs of N MiB on /tmp (default: /tmp stays on
#                    the initramfs)
#   kva.qga=1        also start qemu-guest-agent (only in the benchmark's
#                    initramfs, which carries /usr/sbin/qemu-ga and its
#                    libraries) on the port named org.qemu.guest_agent.0
#   kva.qga_block=L  qemu-ga's -b list (comma-separated RPCs to block)
#
# Console protocol (ttyS0), read by the harness in crates/vmtest:
#   KVA-INIT <text>          progress of this script
#   KVA-AGENT-PID <pid>      the agent was started
#   KVA-QGA-PID <pid>        qemu-guest-agent was started (kva.qga=1)
#   KVA-LATE-LOADED <mods>   the late modules were loaded
#   KVA-CPU <ticks> fds=<n> rss_kib=<kib>
#                            every second: utime+stime of the agent in clock
#                            ticks, its open file descriptors, its VmRSS
#   KVA-AGENT-EXITED <code>  the agent is gone
#   KVA-INIT poweroff requested / reboot requested / halt requested
#                            busybox poweroff/reboot/halt signalled this init
# The agent's own log (stderr) goes to the console too.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
# The initramfs's root comes up world-writable (1777); a real root is 755,
# and the agent refuses to run commands below a directory others can write.
chmod 755 /
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "KVA-$*"; }

# busybox poweroff, reboot and halt (without -f) ask PID 1 by signal: USR2,
# TERM and USR1. This script is PID 1, so it does what busybox init would
# (the trap runs once the current `sleep 1` ends).
trap 'say "INIT poweroff requested"; sync; poweroff -f' USR2
trap 'say "INIT reboot requested"; sync; reboot -f' TERM
trap 'say "INIT halt requested"; sync; halt -f' USR1

agent=virtio-serial
late=virtio_console
late_after=1
level=info
config=""
tmp_mib=""
qga=""
qga_block=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kva.agent=*) agent="${arg#kva.agent=}" ;;
        kva.late=*) late="${arg#kva.late=}" ;;
        kva.late_after=*) late_after="${arg#kva.late_after=}" ;;
        kva.log=*) level="${arg#kva.log=}" ;;
        kva.config=*) config="${arg#kva.config=}" ;;
        kva.tmp_mib=*) tmp_mib="${arg#kva.tmp_mib=}" ;;
        kva.qga=*) qga="${arg#kva.qga=}" ;;
        kva.qga_block=*) qga_block="${arg#kva.qga_block=}" ;;
    esac
done
say "INIT agent=$agent late=$late late_after=$late_after log=$level config=${config:-none}"
if [ -n "$tmp_mib" ]; then
    mount -t tmpfs -o "size=${tmp_mib}m,mode=1777" tmpfs /tmp || say "INIT cannot mount /tmp"
fi

is_late() { case ",$late," in *",$1,"*) return 0 ;; esac; return 1; }
load() { insmod "/lib/modules/$1.ko" || say "INIT insmod $1 failed"; }

for m in $(cat /etc/kva-modules); do
    is_late "$m" || load "$m"
done
say "INIT early modules loaded"

set --
for t in $(echo "$agent" | tr ',' ' '); do
    set -- "$@" --transport "$t"
done
if [ -n "$config" ]; then
    if [ -f "/etc/kva/$config.toml" ]; then
        set -- "$@" --config "/etc/kva/$config.toml"
    else
        say "INIT no configuration /etc/kva/$config.toml"
    fi
fi
/sbin/kvm-manager-agent "$@" --log-level "$level" </dev/null &
pid=$!
say "AGENT-PID $pid"

# qemu-guest-agent, for the benchmark: its port's node appears before its
# name, so look for the name for up to 5 s.
if [ "$qga" = 1 ]; then
    qga_dev=""
    tries=0
    while [ -z "$qga_dev" ] && [ "$tries" -lt 50 ]; do
        for f in /sys/class/virtio-ports/*/name; do
            if [ -r "$f" ] && [ "$(cat "$f")" = org.qemu.guest_agent.0 ]; then
                qga_dev="/dev/${f#/sys/class/virtio-ports/}"
                qga_dev="${qga_dev%/name}"
            fi
        done
        [ -n "$qga_dev" ] || { sleep 0.1; tries=$((tries + 1)); }
    done
    if [ -x /usr/sbin/qemu-ga ] && [ -n "$qga_dev" ]; then
        mkdir -p /run/qga
        LD_LIBRARY_PATH=/lib/x86_64-linux-gnu /usr/sbin/qemu-ga -m virtio-serial \
            -p "$qga_dev" -t /run/qga -f /run/qga/qemu-ga.pid ${qga_block:+-b "$qga_block"} \
            </dev/null &
        say "QGA-PID $!"
    else
        say "INIT cannot start qemu-ga (binary or port org.qemu.guest_agent.0 missing)"
    fi
fi

n=0
while true; do
    if [ "$n" -eq "$late_after" ]; then
        loaded=""
        for m in $(cat /etc/kva-modules); do
            if is_late "$m"; then load "$m"; loaded="$loaded $m"; fi
        done
        say "LATE-LOADED${loaded:- (none)}"
    fi
    state=$(awk '{ if ($3 == "Z") print "Z"; else print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null)
    if [ -z "$state" ] || [ "$state" = Z ]; then
        wait "$pid"
        say "AGENT-EXITED $?"
        while true; do sleep 3600; done
    fi
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status" 2>/dev/null)
    say "CPU $state fds=$fds rss_kib=${rss:-0}"
    sleep 1
    n=$((n + 1))
done
