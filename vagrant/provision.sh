#!/usr/bin/env bash
# Install botwarden on Debian 12 (as root).
#
#   bash vagrant/provision.sh          # = install
#   bash vagrant/provision.sh install  # for development: packages, .venv in this checkout (editable), host set-up
#   bash vagrant/provision.sh demo     # install, then run the self-contained demo
#   bash vagrant/provision.sh test     # install, then run the whole test suite
#   bash vagrant/provision.sh bastion  # the service on a bastion (README, "Install on a bastion"):
#       /opt/botwarden/venv (this checkout, not editable), /usr/local/bin/botwarden,
#       /etc/botwarden (botwarden.toml 0600 and the secret files), /var/lib/botwarden, /var/log/botwarden,
#       botwarden.service + botwarden-bots.slice, persistent cgroup2/bpffs mounts. Run it again to
#       upgrade: the config, the secret files and the audit data are kept.
#
# Safe to run twice: every step checks before it acts; a second `bastion` run changes no file.
# DESTDIR=/some/dir (bastion only): lay the files out under that root instead of / and leave the
# host alone (no packages, mounts, kernel-header links or systemctl); tests use it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BOTWARDEN_VENV:-$ROOT/.venv}
ACTION=${1:-install}
shift || true

log() { printf '[provision] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh must run as root (it installs packages, loads eBPF programs, mounts cgroup2)" >&2
    exit 1
fi

# What the service needs on a bastion.
RUNTIME_PACKAGES=(
    nftables iproute2                            # the nftables fallback
    python3-bpfcc bpfcc-tools bpftool linux-headers-amd64   # eBPF probes (bcc)
    python3-venv openssl ca-certificates procps util-linux
    gcc python3-dev libssl-dev                   # the compiled hot paths (setup.py: appliance/hotpath, analytics/_chain.pyx, _schema.pyx)
)
# What the demo, the tests and the benchmarks need besides.
DEV_PACKAGES=(
    postgresql postgresql-contrib pgbouncer      # targets and the peer proxy for benchmarks
    postgresql-plperl-15                         # a function in another language (PL/Perl) for the catalog tests
    openssh-server openssh-client                # SSH targets
    rsyslog                                      # the SIEM receiver of the audit stream's tests
    strace                                       # which syscalls the audit process makes (journal_sync test)
    tmux                                         # the console's tests in a real terminal
    tshark                                       # decodes `session export --pcap` in its tests
    containerd runc containernetworking-plugins busybox-static  # the Kubernetes tests' node (tests/k8s/node.py)
)

install_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "apt packages present"
        return
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Do not let package scripts start the system's own postgresql/pgbouncer/sshd services:
    # botwarden's tests and demo start their own instances on loopback.
    local added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $added_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

install_venv() {
    local py=${BOTWARDEN_PYTHON:-python3}
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv at $VENV"
        "$py" -m venv "$VENV"
    fi
    local stamp="$VENV/.botwarden-installed"
    # The compiled hot paths are built by this install (setup.py): again when their source changed.
    if [ ! -e "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] \
        || [ "$ROOT/appliance/hotpath/_compiled.pyx" -nt "$stamp" ] \
        || [ "$ROOT/analytics/_chain.pyx" -nt "$stamp" ] || [ "$ROOT/analytics/_schema.pyx" -nt "$stamp" ]; then
        log "installing botwarden and its dependencies into the venv"
        "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
        touch "$stamp"
    else
        log "venv up to date"
    fi
    # bcc is Debian's python3-bpfcc (pure Python over libbcc.so). Link only its package into the
    # venv; adding all of dist-packages would shadow newer PyPI packages.
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
        ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
    fi
}

setup_host() {
    # Kernel headers for bcc, cgroup2 and bpffs mounts.
    # shellcheck source=../probes/setup-host.sh
    if [ -f "$ROOT/probes/setup-host.sh" ]; then
        bash "$ROOT/probes/setup-host.sh"
    fi
}

if [ "$ACTION" = bastion ]; then
    # shellcheck source=bastion.sh
    . "$ROOT/vagrant/bastion.sh"
    install_bastion
    exit 0
fi

install_apt "${RUNTIME_PACKAGES[@]}" "${DEV_PACKAGES[@]}"
install_venv
setup_host

case "$ACTION" in
    install) log "installed; run: $VENV/bin/botwarden --help" ;;
    demo) exec "$VENV/bin/botwarden" demo "$@" ;;
    test)
        cd "$ROOT"
        # The Kubernetes tests need kube-apiserver, built from Debian's source package once per
        # machine (minutes on a fresh one; cached under /var/cache/botwarden/kubernetes after);
        # --node adds the kubelet and the pause binary for the tests that run pods.
        bash "$ROOT/tests/k8s/build.sh" --node >/dev/null
        # --durations: the slowest tests in every CI log, so the suite's time stays visible.
        exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@" ;;
    *) echo "usage: provision.sh [install|demo|test|bastion]" >&2; exit 2 ;;
esac
