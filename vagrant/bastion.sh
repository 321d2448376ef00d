# `vagrant/provision.sh bastion`: botwarden as the bastion's service. Sourced by provision.sh
# (which defines ROOT, log, install_apt and RUNTIME_PACKAGES); not run on its own.
#
# Every step looks before it acts and writes only what is missing or different, so a second run
# changes no file (tests/test_provision.py checks modes, owners, contents and mtimes), and a run
# from a newer checkout is the upgrade: the package and the units are replaced, the config, the
# secret files and /var/lib/botwarden are never touched once they exist.

DEST=${DESTDIR:-}
DEST=${DEST%/}
OPT=$DEST/opt/botwarden
BASTION_VENV=$OPT/venv
ETC=$DEST/etc/botwarden
UNITS=$DEST/etc/systemd/system
CHANGED_UNITS=0
CHANGED_PACKAGE=0

# systemd is PID 1 (not in a container or a chroot without it).
systemd_runs() { [ -d /run/systemd/system ]; }

# install -m MODE SRC DST, only when DST is missing or differs; says whether it did.
put_file() {
    local mode=$1 src=$2 dst=$3
    if [ -e "$dst" ] && cmp -s "$src" "$dst"; then
        [ "$(stat -c %a "$dst")" = "${mode#0}" ] || chmod "$mode" "$dst"
        return 1
    fi
    install -D -m "$mode" "$src" "$dst"
    log "wrote $dst"
}

# A directory with this mode (created if missing, mode fixed if it differs).
put_dir() {
    local mode=$1 dir=$2
    if [ ! -d "$dir" ]; then
        install -d -m "$mode" "$dir"
        log "created $dir"
    elif [ "$(stat -c %a "$dir")" != "${mode#0}" ]; then
        chmod "$mode" "$dir"
        log "$dir: mode set to $mode"
    fi
}

# A file made by a command, only if missing (secrets: never replaced once they exist).
new_secret() {
    local dst=$1; shift
    [ -e "$dst" ] && return 0
    (umask 077 && "$@" > "$dst.tmp") && mv "$dst.tmp" "$dst"
    chmod 0600 "$dst"
    log "created $dst"
}

# What the package would be built from: a new digest means a new version to install.
source_digest() {
    (cd "$ROOT" && { echo pyproject.toml; echo README.md;
        find appliance analytics probes tui -type f ! -path '*/__pycache__/*' ! -name '*.pyc'; } |
        LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}

bastion_venv() {
    local py=${BOTWARDEN_PYTHON:-python3}
    put_dir 0755 "$DEST/opt"
    put_dir 0755 "$OPT"
    if [ ! -x "$BASTION_VENV/bin/python" ]; then
        log "creating $BASTION_VENV"
        "$py" -m venv "$BASTION_VENV"
    fi
    local stamp=$OPT/installed-source.sha256 digest
    digest=$(source_digest)
    if [ ! -e "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        # Built from a copy: pip builds in the source tree (build/, *.egg-info) and the checkout
        # stays as it was. --force-reinstall: the version number does not change between commits.
        local src
        src=$(mktemp -d)
        cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/appliance" "$ROOT/analytics" "$ROOT/probes" \
            "$ROOT/tui" "$src/"
        find "$src" -name __pycache__ -type d -prune -exec rm -rf {} +
        log "installing botwarden ($digest) into $BASTION_VENV"
        if [ -x "$BASTION_VENV/bin/botwarden" ]; then  # an upgrade: the new code, then any new dependency
            "$BASTION_VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$src"
        fi
        "$BASTION_VENV/bin/pip" install -q --disable-pip-version-check "$src"
        rm -rf "$src"
        echo "$digest" > "$stamp"
        CHANGED_PACKAGE=1
    else
        log "botwarden in $BASTION_VENV is this checkout's ($digest)"
    fi
    # bcc is Debian's python3-bpfcc: link only its package into the venv.
    local site
    site=$("$BASTION_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ] && [ ! -L "$site/bcc" ]; then
        ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
    fi
    # On PATH. Relative, so it also resolves inside DESTDIR.
    put_dir 0755 "$DEST/usr/local/bin"
    local link=$DEST/usr/local/bin/botwarden target=../../../opt/botwarden/venv/bin/botwarden
    if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
        ln -sfn "$target" "$link"
        log "linked $link -> $target"
    fi
}

bastion_files() {
    put_dir 0700 "$ETC"
    put_dir 0700 "$ETC/tls"
    put_dir 0700 "$DEST/var/lib/botwarden"
    put_dir 0700 "$DEST/var/log/botwarden"
    # The example of this version beside the config, to compare after an upgrade.
    put_file 0600 "$ROOT/botwarden.example.toml" "$ETC/botwarden.example.toml" || true
    if [ ! -e "$ETC/botwarden.toml" ]; then
        # The example, with the bots' parent cgroup set to the slice this script installs.
        sed 's|^bots_cgroup = .*|bots_cgroup = "botwarden.slice/botwarden-bots.slice"|' \
            "$ROOT/botwarden.example.toml" > "$ETC/botwarden.toml.tmp"
        chmod 0600 "$ETC/botwarden.toml.tmp"
        mv "$ETC/botwarden.toml.tmp" "$ETC/botwarden.toml"
        log "created $ETC/botwarden.toml (from botwarden.example.toml): edit it"
    elif [ "$(stat -c %a "$ETC/botwarden.toml")" != 600 ]; then
        chmod 0600 "$ETC/botwarden.toml"
        log "$ETC/botwarden.toml: mode set to 0600"
    fi
    # Secret files the config names. Created once, never replaced.
    new_secret "$ETC/masking-salt" openssl rand -hex 32
    new_secret "$ETC/vault-secret-id" printf ''   # the AppRole secret id goes here
    if [ ! -e "$ETC/tls/server.key" ]; then
        local host
        host=$(hostname -f 2>/dev/null || hostname)
        (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
            -subj "/CN=$host" -addext "subjectAltName=DNS:$host,IP:127.0.0.1" \
            -keyout "$ETC/tls/server.key" -out "$ETC/tls/server.crt" 2>/dev/null)
        chmod 0600 "$ETC/tls/server.key"
        chmod 0644 "$ETC/tls/server.crt"
        log "created a self-signed certificate for bots that ask for TLS: $ETC/tls/server.crt (replace it with yours)"
    fi
}

bastion_units() {
    put_dir 0755 "$DEST/etc/systemd"
    put_dir 0755 "$UNITS"
    put_file 0644 "$ROOT/vagrant/botwarden.service" "$UNITS/botwarden.service" && CHANGED_UNITS=1
    put_file 0644 "$ROOT/vagrant/botwarden-bots.slice" "$UNITS/botwarden-bots.slice" && CHANGED_UNITS=1
    return 0
}

# cgroup2 and bpffs at every boot. systemd (PID 1) mounts both itself as API file systems: bpffs at
# /sys/fs/bpf, cgroup2 at /sys/fs/cgroup (unified, Debian 12's default) or /sys/fs/cgroup/unified
# (hybrid). Where it does not (no systemd, or a legacy-only cgroup setup), an /etc/fstab line each.
bastion_mounts() {
    local cgroup2_before=$1 fstab=$DEST/etc/fstab need=()
    if systemd_runs; then
        [ -n "$cgroup2_before" ] || need+=("cgroup2 $(botwarden_probes_cgroup2_mount) cgroup2 rw,nosuid,nodev,noexec,relatime 0 0")
    else
        need+=("bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0")
        local cg
        cg=$(botwarden_probes_cgroup2_mount)
        if [ -z "$cg" ]; then
            [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] && cg=/sys/fs/cgroup/unified || cg=/sys/fs/cgroup
        fi
        need+=("cgroup2 $cg cgroup2 rw,nosuid,nodev,noexec,relatime 0 0")
    fi
    if [ ${#need[@]} -eq 0 ]; then
        log "systemd mounts cgroup2 and bpffs at boot: no fstab lines needed"
        return 0
    fi
    put_dir 0755 "$DEST/etc"
    local line point
    for line in "${need[@]}"; do
        point=$(echo "$line" | awk '{print $2}')
        if [ -e "$fstab" ] && awk -v p="$point" '$1 !~ /^#/ && $2 == p { f = 1 } END { exit !f }' "$fstab"; then
            continue   # the operator's (or our earlier) line for that mount point stays
        fi
        printf '# botwarden (vagrant/provision.sh bastion): the eBPF probes need it\n%s\n' "$line" >> "$fstab"
        log "added to $fstab: $line"
    done
}

install_bastion() {
    # shellcheck source=../probes/setup-host.sh
    . "$ROOT/probes/setup-host.sh"
    local cgroup2_before
    cgroup2_before=$(botwarden_probes_cgroup2_mount)
    if [ -z "$DEST" ]; then
        install_apt "${RUNTIME_PACKAGES[@]}"
    else
        log "DESTDIR=$DEST: files only (no packages, mounts, kernel-header links or systemctl)"
    fi
    bastion_venv
    bastion_files
    bastion_units
    bastion_mounts "$cgroup2_before"
    if [ -z "$DEST" ]; then
        # Kernel headers for bcc, and cgroup2/bpffs mounted now (the fstab lines are for the next boot).
        botwarden_probes_link_headers
        botwarden_probes_mount_bpffs
        botwarden_probes_mount_cgroup2 >/dev/null
        if systemd_runs; then
            [ $CHANGED_UNITS -eq 0 ] || systemctl daemon-reload
            if systemctl is-active --quiet botwarden.service && [ $((CHANGED_UNITS + CHANGED_PACKAGE)) -gt 0 ]; then
                log "restarting botwarden.service (bots are refused, never sent direct, meanwhile)"
                systemctl restart botwarden.service
            fi
        fi
    fi
    log "botwarden is installed: edit $ETC/botwarden.toml, then: botwarden config check && botwarden doctor" \
        "&& systemctl enable --now botwarden"
}
