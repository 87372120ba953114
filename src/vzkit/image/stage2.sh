#!/run/vzkit/busybox sh
# vzkit guest, stage 2: PID 1 in an image's root, after the initramfs's /init (init.sh)
# mounted it and switch_rooted here. Everything this script runs is the busybox of the
# initramfs, copied to /run/vzkit (a tmpfs over the image's /run), so an image without
# /bin/sh works as well. It brings the network up (DHCP; DNS through /etc/resolv.conf), starts
# the agent with the image's PATH, watches the power button, prints VZKIT-GUEST-READY and runs
# a shell on the console; when that shell exits the guest powers off. vzkit.init=image on the
# kernel command line instead execs the image's /sbin/init with the agent beside it.

V=/run/vzkit
"$V/busybox" --install -s "$V/bin"
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PATH=$V/bin:$IMAGE_PATH  # our applets first: this script needs nothing of the image
HOME=/root
export PATH HOME
cd /

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
init_mode=agent
for arg in $cmdline; do
    case "$arg" in vzkit.init=*) init_mode=${arg#vzkit.init=} ;; esac
done
set +f

# DNS: the DHCP client writes $V/resolv.conf (our tmpfs) and /etc/resolv.conf leads there
# without writing into the image: a regular file gets our file bind-mounted over it (after
# switch_root, so the mount stays inside this root); a symlink into /run (systemd-resolved's
# stub, resolvconf) gets its target made in our tmpfs. Only a symlink elsewhere, dangling or
# not, or a missing file is replaced, in the VM's own layer.
resolv_setup() {
    : >"$V/resolv.conf"
    conf=/etc/resolv.conf
    if [ -L "$conf" ]; then
        target=$(readlink "$conf")
        case "$target" in
            /*) ;;
            *) target=/etc/$target ;;
        esac
        target=$(echo "$target" | sed -e 's#/\./#/#g' -e 's#^/etc/\.\./#/#')
        case "$target" in
            "$V/resolv.conf") return ;;  # made so at an earlier boot of this disk or layer
            /run/*)
                case "$target" in *..*) ;; *)
                    mkdir -p "${target%/*}" && ln -sf "$V/resolv.conf" "$target" && return ;;
                esac ;;
        esac
        rm -f "$conf" && ln -s "$V/resolv.conf" "$conf"
    elif [ -f "$conf" ]; then
        mount --bind "$V/resolv.conf" "$conf"
    else
        mkdir -p /etc && ln -s "$V/resolv.conf" "$conf"
    fi
}

if [ -e /sys/class/net/eth0 ]; then
    resolv_setup 2>/dev/null || echo "vzkit-init: cannot set up /etc/resolv.conf" >/dev/console
    cat >"$V/udhcpc.sh" <<EOS
#!$V/busybox sh
PATH=$V/bin
EOS
    cat >>"$V/udhcpc.sh" <<'EOS'
case "$1" in
    bound | renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        : >/run/vzkit/resolv.conf.new
        for server in $dns; do echo "nameserver $server" >>/run/vzkit/resolv.conf.new; done
        cat /run/vzkit/resolv.conf.new >/run/vzkit/resolv.conf  # in place: it is bind-mounted
        ;;
esac
EOS
    chmod 755 "$V/udhcpc.sh"
    ip link set eth0 up
    udhcpc -i eth0 -b -q -t 10 -s "$V/udhcpc.sh" >/dev/null 2>&1
fi

# The agent (see init.sh): its commands see the image's PATH and HOME, not our applets.
if [ -x "$V/vzkit-agent" ]; then
    set --
    case " $cmdline " in
        *" vzkit.agent_key=fw_cfg "*)
            set -- --key-file /sys/firmware/qemu_fw_cfg/by_name/opt/org.vzkit/agent-key/raw ;;
    esac
    env -i PATH="$IMAGE_PATH" HOME=/root TERM=linux "$V/vzkit-agent" serve "$@" \
        </dev/null >/dev/console 2>&1 &
fi

if [ "$init_mode" = image ]; then
    ready_marker
    [ -x /sbin/init ] || {
        echo "vzkit-init: FATAL: vzkit.init=image but the image has no /sbin/init" >/dev/console
        sync
        poweroff -f
    }
    exec env -i PATH="$IMAGE_PATH" HOME=/root TERM=linux /sbin/init
fi

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
    done
done

ready_marker

PATH=$IMAGE_PATH:$V/bin setsid cttyhack "$V/busybox" sh -l </dev/console >/dev/console 2>&1
echo "vzkit-init: console shell exited, powering off" >/dev/console
sync
poweroff -f
