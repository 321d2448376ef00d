#!/usr/bin/env bash
# Build a real Kubernetes control plane (and, with --node, a node) for botwarden's tests, once per machine.
#
#   bash tests/k8s/build.sh                  # build if missing, print the directory holding the binaries
#   bash tests/k8s/build.sh --node           # also the kubelet and the pause binary (tests/k8s/node.py)
#   bash tests/k8s/build.sh --check [--node] # exit 0 if the cached build exists, 1 if not (no network)
#
# No registry ships a kube-apiserver binary, so it is built offline from Debian's `kubernetes`
# source package (the full 1.20.2 tree with vendor/) with Debian's Go, through the tree's own
# Makefile (GOPATH mode, as Debian's rules build it). kubectl 1.20 comes from Debian's
# `kubernetes-client` .deb and is unpacked next to it rather than installed, because some hosts
# already have another package owning /usr/bin/kubectl. etcd 3.4 is Debian's `etcd-server`.
# --node builds the kubelet from the same tree (`make WHAT=cmd/kubelet`) and the pause binary
# from its build/pause/linux/pause.c (gcc -static); the node's runtime is Debian's containerd,
# runc, CNI plugins and busybox-static (installed here when missing).
#
# The result is cached by the Debian package version under $BOTWARDEN_K8S_CACHE
# (default /var/cache/botwarden/kubernetes/<version>/), outside the repository; later runs on
# the same machine reuse it, and a --node build next to a cached control plane builds only the
# kubelet. The build takes minutes and ~2 GB of scratch space, which is deleted afterwards; it
# runs under `nice` so other work on the machine keeps going. Two runs at once are serialised by
# a lock; the second finds the first's result. Must run as root (apt-get). docs/kubernetes.md has
# the facts behind each step.
set -euo pipefail

CACHE_ROOT=${BOTWARDEN_K8S_CACHE:-/var/cache/botwarden/kubernetes}
log() { printf '[k8s-build] %s\n' "$*" >&2; }

# The version of Debian's kubernetes packages this machine's apt would install: the cache key.
version=$(apt-cache policy kubernetes-client 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    log "apt knows no kubernetes-client package (run apt-get update?)"
    exit 1
fi
out="$CACHE_ROOT/$version"

check=0 node=0
for arg in "$@"; do
    case "$arg" in
        --check) check=1 ;;
        --node) node=1 ;;
        *) log "usage: build.sh [--check] [--node]"; exit 2 ;;
    esac
done

# The make targets still missing from the cache (empty: everything asked for is there).
missing_targets() {
    targets=()
    { [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/etcd" ]; } || targets+=(cmd/kube-apiserver)
    if [ $node -eq 1 ] && ! { [ -x "$out/kubelet" ] && [ -x "$out/pause" ]; }; then
        targets+=(cmd/kubelet)
    fi
}
missing_targets
if [ ${#targets[@]} -eq 0 ]; then
    [ $check -eq 1 ] && exit 0
    echo "$out"
    exit 0
fi
[ $check -eq 1 ] && exit 1

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs golang-go, rsync, etcd-server with apt)"
    exit 1
fi

# One build at a time per cache: a second run waits, then finds the first one's result.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.build.lock"
flock 9
missing_targets
if [ ${#targets[@]} -eq 0 ]; then
    echo "$out"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
need=()
packages=(golang-go rsync etcd-server)
[ $node -eq 1 ] && packages+=(gcc libc6-dev containerd runc containernetworking-plugins busybox-static)
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    # etcd-server's package scripts would start a system etcd on the default ports; the tests
    # start their own, so keep package scripts from starting services.
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ $added_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
fi

work=$(mktemp -d /var/tmp/botwarden-k8s-build.XXXXXX)
# The scratch directory goes when the build succeeds; a failed build keeps it (and its log).
trap 'if [ $? -eq 0 ]; then rm -rf "$work"; else log "build failed; scratch kept in $work"; fi' EXIT
start=$(date +%s)

# deb-src entries live in a private apt configuration inside the scratch directory, so the
# host's own apt sources are left as they are.
mkdir -p "$work/apt/lists/partial"
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$work/apt/debian-src.sources"
aptopts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/apt"
         -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
log "fetching the kubernetes source package $version"
apt-get "${aptopts[@]}" update -qq
(cd "$work" && apt-get "${aptopts[@]}" source -qq --download-only "kubernetes=$version" >/dev/null)
if [[ " ${targets[*]} " == *" cmd/kube-apiserver "* ]]; then
    (cd "$work" && apt-get -o "APT::Sandbox::User=root" download -qq "kubernetes-client=$version" >/dev/null)
fi

tarball=$(ls "$work"/kubernetes_*.orig.tar.gz | head -1)
mkdir -p "$work/src"
tar xzf "$tarball" -C "$work/src"
tree=$(ls -d "$work"/src/kubernetes-*/ | head -1)
mkdir -p "$tree/.go/src/k8s.io"
ln -s ../../.. "$tree/.go/src/k8s.io/kubernetes"

log "building ${targets[*]} (several minutes each)"
(
    cd "$tree"
    # Go's build cache outlives a failed attempt (a retry takes a minute, not the whole build)
    # and is removed with the scratch directory once the build succeeds.
    export GOPATH=$tree/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS= HOME=$work/home GOCACHE=$CACHE_ROOT/.go-build
    mkdir -p "$HOME"
    rc=0
    nice -n 10 make WHAT="${targets[*]}" >"$work/build.log" 2>&1 || rc=$?
    for t in "${targets[@]}"; do
        if [ $rc -ne 0 ] || [ ! -x "_output/bin/${t#cmd/}" ]; then
            tail -40 "$work/build.log" >&2
            log "make WHAT=\"${targets[*]}\" failed (exit $rc)"
            exit 1
        fi
    done
    if [ $node -eq 1 ]; then
        # The pause image's only file; CFLAGS as in build/pause/Makefile.
        nice -n 10 gcc -Os -Wall -Werror -static -DVERSION=v3.4-botwarden \
            -o _output/bin/pause build/pause/linux/pause.c
    fi
)

staging="$out.partial"
rm -rf "$staging"
mkdir -p "$staging"
# What is cached already stays as it is (an apiserver is not rebuilt when only the kubelet is asked for).
[ -d "$out" ] && cp -a "$out/." "$staging/"
if [[ " ${targets[*]} " == *" cmd/kube-apiserver "* ]]; then
    mkdir -p "$work/client"
    dpkg-deb -x "$work"/kubernetes-client_*.deb "$work/client"
    install -m 0755 "$tree/_output/bin/kube-apiserver" "$staging/kube-apiserver"
    install -m 0755 "$work/client/usr/bin/kubectl" "$staging/kubectl"
    ln -sf "$(command -v etcd)" "$staging/etcd"
fi
if [ $node -eq 1 ]; then
    install -m 0755 "$tree/_output/bin/kubelet" "$staging/kubelet"
    install -m 0755 "$tree/_output/bin/pause" "$staging/pause"
fi
seconds=$(( $(date +%s) - start ))
for t in "${targets[@]}"; do
    printf '%s_build_seconds=%s\n%s_built=%s\n' "${t#cmd/}" "$seconds" "${t#cmd/}" "$(date -u +%FT%TZ)"
done >> "$staging/BUILD-INFO"
grep -q '^version=' "$staging/BUILD-INFO" || sed -i "1i version=$version" "$staging/BUILD-INFO"
rm -rf "$out"
mv "$staging" "$out"
rm -rf "$CACHE_ROOT/.go-build"
log "built ${targets[*]} in ${seconds}s: $out"
echo "$out"
