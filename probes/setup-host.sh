#!/bin/sh
# botwarden probes: host set-up for the eBPF path (idempotent).
#
# Source this file and call `botwarden_probes_setup_host [VENV]`, or run it
# directly: `sh probes/setup-host.sh [VENV]`. Safe to run any number of times.
#
# What it does, and why:
#   - makes Debian's bcc (python3-bpfcc, pure Python over libbcc.so) importable
#     from the venv by symlinking just that one package folder (adding all of
#     dist-packages would shadow newer PyPI packages);
#   - points /lib/modules/$(uname -r)/{build,source} at the installed
#     linux-headers when the running kernel ships none (bcc needs them; the
#     programs only use UAPI structs, so older headers compile fine);
#   - makes sure cgroup v2 is mounted (reuses an existing cgroup2 mount, e.g.
#     /sys/fs/cgroup/unified on hybrid hosts) and bpffs at /sys/fs/bpf.
# It prints the cgroup2 mount point it found or made as its last line.

botwarden_probes_log() { echo "botwarden-probes: $*" >&2; }

botwarden_probes_link_bcc() {
    venv="$1"
    [ -n "$venv" ] || return 0
    src=/usr/lib/python3/dist-packages/bcc
    if [ ! -d "$src" ]; then
        botwarden_probes_log "python3-bpfcc is not installed ($src missing)"
        return 1
    fi
    for site in "$venv"/lib/python3*/site-packages; do
        [ -d "$site" ] || continue
        if [ -L "$site/bcc" ] || [ -e "$site/bcc" ]; then
            continue
        fi
        ln -s "$src" "$site/bcc"
        botwarden_probes_log "linked $src into $site"
    done
}

botwarden_probes_link_headers() {
    rel=$(uname -r)
    mod=/lib/modules/$rel
    if [ -e "$mod/build/include" ] || [ -e "$mod/build/Makefile" ]; then
        return 0   # the running kernel ships its own headers
    fi
    # Newest installed Debian header pair (…-amd64 + …-common).
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$arch_dir" ]; then
        botwarden_probes_log "no /usr/src/linux-headers-*-amd64: install linux-headers-amd64"
        return 1
    fi
    common_dir="${arch_dir%-amd64}-common"
    mkdir -p "$mod"
    ln -sfn "$arch_dir" "$mod/build"
    [ -d "$common_dir" ] && ln -sfn "$common_dir" "$mod/source"
    botwarden_probes_log "linked $mod/build -> $arch_dir"
}

botwarden_probes_cgroup2_mount() {
    # First existing cgroup2 mount wins (pure v2 host: /sys/fs/cgroup; hybrid: …/unified).
    awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts
}

botwarden_probes_mount_cgroup2() {
    found=$(botwarden_probes_cgroup2_mount)
    if [ -n "$found" ]; then
        echo "$found"
        return 0
    fi
    if [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = "tmpfs" ]; then
        target=/sys/fs/cgroup/unified   # hybrid layout: v1 controllers under a tmpfs
    else
        target=/sys/fs/cgroup
    fi
    mkdir -p "$target"
    mount -t cgroup2 none "$target" || return 1
    botwarden_probes_log "mounted cgroup2 at $target"
    echo "$target"
}

botwarden_probes_mount_bpffs() {
    if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { f = 1 } END { exit !f }' /proc/self/mounts; then
        return 0
    fi
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || return 1
    botwarden_probes_log "mounted bpffs at /sys/fs/bpf"
}

botwarden_probes_setup_host() {
    venv="${1:-}"
    if [ "$(id -u)" != 0 ]; then
        botwarden_probes_log "must run as root"
        return 1
    fi
    botwarden_probes_link_bcc "$venv" || return 1
    botwarden_probes_link_headers || return 1
    botwarden_probes_mount_bpffs || return 1
    botwarden_probes_mount_cgroup2 || return 1
}

# Run directly (not sourced): do the set-up.
case "$0" in
    *setup-host.sh) botwarden_probes_setup_host "$@" ;;
esac
