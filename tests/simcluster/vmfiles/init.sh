#!/bin/bash
# PID 1 of one simulated BOSH VM.
#
# Started by tests/simcluster/cluster.py as
#   nsenter --net=/run/netns/<ns> unshare --mount --uts --ipc --pid --fork --kill-child \
#           --mount-proc /bin/bash <vm dir>/init.sh <vm dir>
# so it already runs in the VM's network namespace and in fresh mount/uts/ipc/pid namespaces.
# Each VM gets its own copy of this file: bash reads a script while running it, and a shared
# copy rewritten for another VM would change what a running init executes.
#
# SIGKILL of this process (from the host) is a power cut: the kernel kills every process of
# the PID namespace and the mount namespace goes away; the per-VM directories on the host
# (overlay upper layers, /var/vcap, /tmp, /root) are the disk that survives it.
set -uo pipefail

VMDIR=$1
# shellcheck source=/dev/null
. "$VMDIR/boot.env"
exec >>"$VMDIR/console.log" 2>&1
echo "init: boot of $VM_NAME at $(date --iso-8601=ns)"

fail() {
    echo "init: FATAL: $*"
    # Exiting PID 1 ends the VM; the host sees the unshare process exit and reports it.
    exit 1
}

mount --make-rprivate / || fail "make-rprivate"
hostname "$VM_HOSTNAME" || fail "hostname"

# Persistent per-VM layers over the host's system directories: users, sudoers, sshd host keys
# and anything written under /var stay per VM and survive power cuts.
for d in etc var home; do
    mount -t overlay "pgsim-$d" \
        -o "lowerdir=/$d,upperdir=$VMDIR/upper/$d,workdir=$VMDIR/work/$d" "/$d" ||
        fail "overlay on /$d"
done
mkdir -p /var/vcap || fail "mkdir /var/vcap"
# rbind, not bind: /var/vcap/store is a separate filesystem mounted by the host (its size is
# what disk-full tests shrink).
mount --rbind "$VMDIR/vcap" /var/vcap || fail "bind /var/vcap"
mount --bind "$VMDIR/root" /root || fail "bind /root"
# The host's `ip netns` bind mounts would keep every VM's network namespace referenced from
# this mount namespace.
umount -R -l /run/netns 2>/dev/null
mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m pgsim-run /run || fail "tmpfs /run"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m pgsim-shm /dev/shm || fail "tmpfs /dev/shm"
mount -t sysfs -o ro pgsim-sys /sys || echo "init: warning: no private /sys"
mount --bind /usr /usr || fail "bind /usr"
# BOSH VMs have no monit on the default PATH (only /var/vcap/bosh/bin/monit); the host's
# /usr/bin/monit would read Debian's control file and fail in confusing ways.
mount --bind "$VMDIR/monit-not-on-path" /usr/bin/monit &&
    mount -o remount,bind,ro /usr/bin/monit || fail "hide /usr/bin/monit"
mount -o remount,bind,ro /usr || fail "read-only /usr"

if [ ! -e /etc/pgsim-provisioned ]; then
    # First boot: what the stemcell and `bosh ssh` would have set up.
    # vcap gets the gid the host used for the job files it rendered.
    groupadd -f -g "$VCAP_GID" vcap && groupadd -f bosh_sshers && groupadd -f bosh_sudoers || fail "groups"
    id -u vcap >/dev/null 2>&1 || useradd -m -g vcap -s /bin/bash vcap || fail "user vcap"
    useradd -m -s /bin/bash -G bosh_sshers,bosh_sudoers,vcap "$SSH_USER" || fail "ssh user"
    # `*`, not the `!` useradd leaves: sshd without PAM refuses locked (`!`) accounts even for
    # key logins, while `*` only means "no password".
    usermod -p '*' "$SSH_USER" || fail "usermod"
    install -d -m 0700 -o "$SSH_USER" -g "$SSH_USER" "/home/$SSH_USER/.ssh" &&
        install -m 0600 -o "$SSH_USER" -g "$SSH_USER" "$VMDIR/authorized_keys" \
            "/home/$SSH_USER/.ssh/authorized_keys" || fail "authorized_keys"
    printf '%%bosh_sudoers ALL=(ALL) NOPASSWD: ALL\n' >/etc/sudoers.d/bosh_sudoers &&
        chmod 0440 /etc/sudoers.d/bosh_sudoers || fail "sudoers"
    # The host's keys would be shared by every VM; each VM has its own.
    rm -f /etc/ssh/ssh_host_*
    install -m 0600 "$VMDIR/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key &&
        install -m 0644 "$VMDIR/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub &&
        install -m 0600 "$VMDIR/ssh_host_rsa_key" /etc/ssh/ssh_host_rsa_key &&
        install -m 0644 "$VMDIR/ssh_host_rsa_key.pub" /etc/ssh/ssh_host_rsa_key.pub &&
        install -m 0644 "$VMDIR/sshd_config" /etc/ssh/sshd_config || fail "sshd files"
    install -m 0644 "$VMDIR/hosts" /etc/hosts || fail "hosts"
    # As on a stemcell: interactive root shells (`sudo su -`) find /var/vcap/bosh/bin/monit.
    install -m 0644 "$VMDIR/bosh-path.sh" /etc/profile.d/bosh-path.sh || fail "profile"
    # `bosh ssh` users live here (the agent's useradd -b); see tests/boshdirector.
    install -d -m 0755 /var/vcap/bosh_ssh || fail "bosh_ssh"
    echo "$VM_HOSTNAME" >/etc/hostname
    touch /etc/pgsim-provisioned
fi

# Last mounts: detach the simulator's base directory (other VMs' disks) from this VM's view;
# the per-VM /tmp then hides the host's /tmp. The open script file stays readable.
mkdir -p /run/pgsim-tmp && mount --bind "$VMDIR/tmp" /run/pgsim-tmp || fail "bind tmp"
umount -R -l "$SIM_BASE" || fail "detach $SIM_BASE"
mount --move /run/pgsim-tmp /tmp && rmdir /run/pgsim-tmp || fail "move /tmp"
cd / || fail "cd /"

mkdir -p /run/sshd /var/vcap/sys/log /var/vcap/bosh/log && chmod 0755 /run/sshd
: >/run/utmp
# sshd needs an absolute path to re-exec itself.
/usr/sbin/sshd -E /var/vcap/sys/log/sshd.log || echo "init: sshd failed to start"
/var/vcap/bosh/bin/monit || echo "init: monit failed to start"
/var/vcap/bosh/bin/bosh-agent </dev/null &

# PID 1 must reap orphans (pg_ctl and repmgrd daemonise); bash's SIGCHLD handling reaps every
# child, including reparented ones, while it waits here.
echo "init: up"
while :; do
    sleep 3600 &
    wait $!
done
