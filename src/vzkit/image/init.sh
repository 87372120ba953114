#!/bin/busybox sh
# vzkit guest /init: PID 1 of the initramfs built by vzkit.image.build_guest.
#
# Mounts the kernel file systems, loads the modules listed in /etc/vzkit/modules in order
# ("NAME PATH" per line; module parameters come from the kernel command line as NAME.PARAM=V),
# prints VZKIT-GUEST-READY on the console, then runs a shell on the console. When that shell
# exits the guest powers off.
#
# With root=DEV on the kernel command line (/dev/vdaN, LABEL=.. or UUID=..; rootfstype=,
# rootflags=, vzkit.rootwait=SECONDS) it mounts that root instead, puts the agent and this
# busybox on a tmpfs at /run/vzkit of the new root (the image is not changed), moves /proc,
# /sys and /dev there and switch_roots to /run/vzkit/stage2.sh (docs/images.md). A root that
# does not appear or cannot be mounted is reported on the console and the guest powers off.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
PATH=/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp

# The scheduler favours throughput, as tuned's throughput-performance profile does: a woken
# task preempts the running one only when it is 15 ms behind (the kernel's default is 1 ms on
# one CPU), so the kernel worker a vsock send or receive wakes does not cut the sender or the
# reader short mid-stream (docs/vsock.md, "Performance"). The knob lives in debugfs, which is
# mounted only for this. vzkit.sched=stock on the kernel command line keeps the default.
case " $(cat /proc/cmdline) " in
    *" vzkit.sched=stock "*) ;;
    *)
        if mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
            echo 15000000 >/sys/kernel/debug/sched/wakeup_granularity_ns 2>/dev/null
            umount /sys/kernel/debug
        fi
        ;;
esac

set -f  # the command line is split into words below: no globbing
cmdline=$(cat /proc/cmdline)

# VZKIT-GUEST-READY on the console says the guest is up (tests and benchmarks wait for it);
# vzkit.ready=quiet (an interactive console: 'vzkit run' without a command) leaves it out.
ready_marker() {
    case " $cmdline " in
        *" vzkit.ready=quiet "*) ;;
        *) printf '\nVZKIT-GUEST-READY\n' >/dev/console ;;
    esac
}
if [ -f /etc/vzkit/modules ]; then
    while read -r name path; do
        case "$name" in '' | '#'*) continue ;; esac
        params=
        for arg in $cmdline; do
            case "$arg" in "$name".*=*) params="$params ${arg#"$name".}" ;; esac
        done
        # shellcheck disable=SC2086  # one word per parameter
        insmod "$path" $params 2>/dev/null || [ -d "/sys/module/$name" ] ||
            echo "vzkit-init: cannot load module $name" >/dev/console
    done </etc/vzkit/modules
fi
set +f

# The root disk (root=, rootfstype=, rootflags=, vzkit.rootwait=; stage2.sh reads vzkit.init=).
root= rootfstype= rootflags= rootwait=5
set -f
for arg in $cmdline; do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        rootflags=*) rootflags=${arg#rootflags=} ;;
        vzkit.rootwait=*) rootwait=${arg#vzkit.rootwait=} ;;
    esac
done
set +f
case "$rootwait" in '' | *[!0-9]*) rootwait=5 ;; esac

fatal() {
    echo "vzkit-init: FATAL: $*" >/dev/console
    echo "vzkit-init: powering off" >/dev/console
    sync
    poweroff -f
    sleep 10  # poweroff -f does not return; this only waits for it
}

# Mount root= at /newroot, read-write, or power off with the reason on the console.
mount_root() {
    dev=$root
    tries=$((rootwait * 10))
    while :; do
        case "$root" in
            LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) || dev= ;;
        esac
        [ -n "$dev" ] && [ -b "$dev" ] && break
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            fatal "root device $root did not appear within ${rootwait} s" \
                "(block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' '))"
        fi
        sleep 0.1
    done
    mkdir -p /newroot
    # shellcheck disable=SC2086  # -t TYPE only when given
    out=$(mount ${rootfstype:+-t "$rootfstype"} -o "rw${rootflags:+,$rootflags}" \
        "$dev" /newroot 2>&1) ||
        fatal "cannot mount root $root ($dev, type ${rootfstype:-auto}): $out"
    # The tools this guest needs live on a tmpfs over the image's /run (a directory every
    # Linux image has; created in the VM's layer when missing): nothing of the image changes.
    # A symlink there would resolve in the initramfs, not in the image: refused.
    for dir in run proc sys dev; do
        [ -L "/newroot/$dir" ] && fatal "/$dir in root $root is a symlink; it must be a directory"
    done
    [ -d /newroot/run ] || mkdir -p /newroot/run ||
        fatal "root $root has no /run and it cannot be created"
    mount -t tmpfs -o mode=755,nodev,nosuid tmpfs /newroot/run
    mkdir -p /newroot/run/vzkit/bin
    cp /bin/busybox /newroot/run/vzkit/busybox
    cp /etc/vzkit/stage2.sh /newroot/run/vzkit/stage2.sh
    [ -x /bin/vzkit-agent ] && cp /bin/vzkit-agent /newroot/run/vzkit/vzkit-agent
    chmod 755 /newroot/run/vzkit/busybox /newroot/run/vzkit/stage2.sh
}

R=  # where the guest's root is mounted now ('' or /newroot)
if [ -n "$root" ]; then
    mount_root
    R=/newroot
fi

# Shared folders: the host lists every share's tag in vzkit.shares=, the read-only ones in
# vzkit.ro= and, in vzkit.mounts=TAG=PATH, where a share goes when not at /mnt/<tag>
# (comma-separated, percent-encoded: _volume.share_cmdline). Each is mounted in the guest's
# root ($R): VirtioFS first, else virtio-9p (the qemu backend's fallback), nodev,nosuid: a host
# file is never a device node or a set-id program inside the guest. Read-only shares are
# mounted ro, but the host enforces read-only whatever the guest does. Missing directories on
# the way are made; a symlink on the way is refused (in an image it would resolve here, in the
# initramfs, not in the image).

# decode ENCODED: print the percent-decoded text, or fail when ENCODED holds anything but
# what the host's encoder leaves (so printf sees no '\' and no '%' of its own).
decode() {
    case "$1" in '' | *[!A-Za-z0-9@+._~/%-]*) return 1 ;; esac
    # shellcheck disable=SC2059  # the format is the text with each %XX made \xXX
    printf "$(printf '%s' "$1" | sed 's/%/\\x/g')"
}

# share_dir PATH: make $R$PATH a directory, one component at a time; no symlink on the way.
share_dir() {
    dir=$R rest=$1/
    while [ -n "$rest" ]; do
        part=${rest%%/*} rest=${rest#*/}
        [ -n "$part" ] || continue
        dir=$dir/$part
        [ -L "$dir" ] && { echo "${dir#"$R"} is a symlink"; return 1; }
        [ -d "$dir" ] || mkdir "$dir" 2>/dev/null || { echo "cannot make ${dir#"$R"}"; return 1; }
    done
}

share_tags= ro_tags=, share_paths=, rosetta_tag=
set -f
for arg in $cmdline; do
    case "$arg" in
        vzkit.shares=*) share_tags=${arg#vzkit.shares=} ;;
        vzkit.rosetta=*) rosetta_tag=${arg#vzkit.rosetta=} ;;
        vzkit.ro=*) ro_tags=",${arg#vzkit.ro=}," ;;
        vzkit.mounts=*) share_paths=",${arg#vzkit.mounts=}," ;;
    esac
done
IFS=,  # splits the tag list only: every other expansion below is quoted
for enc in $share_tags; do
    [ "$enc" = "$rosetta_tag" ] && continue  # Rosetta's: registered below, not a share
    if ! tag=$(decode "$enc"); then
        echo "vzkit-init: cannot mount share $enc: the tag is not percent-encoded" >/dev/console
        continue
    fi
    where=/mnt/$tag
    case "$share_paths" in
        *",$enc="*)
            enc_path=${share_paths#*",$enc="}
            where=$(decode "${enc_path%%,*}") || where=
            ;;
    esac
    opts=nodev,nosuid
    case "$ro_tags" in *",$enc,"*) opts=$opts,ro ;; esac
    case "$where/" in
        / | // | [!/]* | */../* | */./*)
            echo "vzkit-init: cannot mount share $tag: bad guest path '$where'" >/dev/console ;;
        *)
            if ! out=$(share_dir "$where"); then
                echo "vzkit-init: cannot mount share $tag at $where: $out" >/dev/console
            else
                mount -t virtiofs -o "$opts" "$tag" "$R$where" 2>/dev/null ||
                    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$opts" \
                        "$tag" "$R$where" 2>/dev/null ||
                    echo "vzkit-init: cannot mount share $tag at $where" >/dev/console
            fi
            ;;
    esac
done
unset IFS
set +f

# Rosetta (the vz backend, rosetta=True): vzkit.rosetta=TAG names the share holding Apple's
# rosetta. It is mounted read-only at /media/rosetta and registered with binfmt_misc for
# x86_64 ELF executables and shared objects (the magic and mask Apple documents); flag F has
# the kernel open the interpreter now, so it keeps working in a root disk's userland after
# switch_root, C runs set-id programs with their own credentials. aarch64 guests only.
if [ -n "$rosetta_tag" ]; then
    if [ "$(uname -m)" != aarch64 ]; then
        echo "vzkit-init: Rosetta is for aarch64 guests; not registered" >/dev/console
    elif ! tag=$(decode "$rosetta_tag"); then
        echo "vzkit-init: cannot mount Rosetta: the tag is not percent-encoded" >/dev/console
    elif ! mkdir -p /media/rosetta ||
        ! { mount -t virtiofs -o ro,nodev,nosuid "$tag" /media/rosetta 2>/dev/null ||
            mount -t 9p -o trans=virtio,version=9p2000.L,ro,nodev,nosuid "$tag" \
                /media/rosetta 2>/dev/null; }; then
        echo "vzkit-init: cannot mount Rosetta's share $tag" >/dev/console
    else
        binfmt=/proc/sys/fs/binfmt_misc
        [ -e $binfmt/register ] || mount -t binfmt_misc binfmt_misc $binfmt 2>/dev/null
        magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00'
        mask='\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
        [ -e $binfmt/rosetta ] ||
            printf '%s' ":rosetta:M::$magic:$mask:/media/rosetta/rosetta:CF" \
                >$binfmt/register 2>/dev/null ||
            echo "vzkit-init: cannot register Rosetta with binfmt_misc" >/dev/console
    fi
fi

[ -f /etc/hostname ] && hostname -F /etc/hostname
ip link set lo up 2>/dev/null

if [ -n "$root" ]; then
    # The kernel file systems move into the new root (with /dev/pts and /dev/shm); the
    # initramfs's own /run and /tmp go. stage2.sh runs as PID 1 in the new root.
    for dir in proc sys dev; do
        [ -d "/newroot/$dir" ] || mkdir -p "/newroot/$dir"
        mount --move "/$dir" "/newroot/$dir" || fatal "cannot move /$dir into the root"
    done
    umount /run /tmp 2>/dev/null
    exec switch_root /newroot /run/vzkit/busybox sh /run/vzkit/stage2.sh
    echo "vzkit-init: FATAL: switch_root to $root failed; powering off" >&2
    poweroff -f
fi

# Networking when a NIC exists: DHCP in the background (QEMU's user-mode network and VZ's NAT
# both serve DHCP), so a guest without a network does not wait for one.
if [ -e /sys/class/net/eth0 ]; then
    cat >/run/udhcpc.sh <<'EOS'
#!/bin/sh
case "$1" in
    bound | renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        : >/etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >>/etc/resolv.conf; done
        ;;
esac
EOS
    chmod 755 /run/udhcpc.sh
    ip link set eth0 up
    udhcpc -i eth0 -b -q -t 10 -s /run/udhcpc.sh >/dev/null 2>&1
fi

# The guest agent (vsock port 1024 and the virtio console port org.vzkit.agent.0). It takes
# vsock connections from the host (CID 2) only; with vzkit.agent_key=fw_cfg (the qemu backend)
# each must also bring the key QEMU serves in fw_cfg, which the agent re-reads per connection
# (a restored guest's QEMU serves a new one). docs/agent-protocol.md, "Authentication".
if [ -x /bin/vzkit-agent ]; then
    set --
    case " $cmdline " in
        *" vzkit.agent_key=fw_cfg "*)
            set -- --key-file /sys/firmware/qemu_fw_cfg/by_name/opt/org.vzkit/agent-key/raw ;;
    esac
    /bin/vzkit-agent serve "$@" </dev/null >/dev/console 2>&1 &
fi

# The power button (ACPI on x86_64, ACPI GED on aarch64 with firmware) powers the guest off,
# so a host's request_stop() is a clean shutdown. /run/vzkit-powerbtn.pids lists the watchers.
for dev in /sys/class/input/input*; do
    [ "$(cat "$dev/name" 2>/dev/null)" = "Power Button" ] || continue
    for ev in "$dev"/event*; do
        [ -e "$ev" ] || continue
        (
            dd if="/dev/input/${ev##*/}" of=/dev/null bs=64 count=1 2>/dev/null
            echo "vzkit-init: power button pressed, powering off" >/dev/console
            sync
            poweroff -f
        ) &
        echo $! >>/run/vzkit-powerbtn.pids
    done
done

ready_marker

setsid cttyhack sh -l </dev/console >/dev/console 2>&1
echo "vzkit-init: console shell exited, powering off" >/dev/console
sync
poweroff -f
