"""Container images built offline for the test node: OCI image layouts written with tarfile + hashlib.

No registry is reachable, so the two images the test node needs are assembled from files on this
machine: the pause image (the ``pause`` binary built by ``tests/k8s/build.sh`` from the Kubernetes
source tree's ``build/pause/linux/pause.c``) and a busybox image (Debian's ``busybox-static``,
with one symlink per applet). Each is an OCI image layout in a tar archive (``oci-layout``,
``index.json``, ``blobs/sha256/...``: one uncompressed layer, a config, a manifest) that
``ctr -n k8s.io images import`` reads; the name containerd gives it comes from the
``io.containerd.image.name`` annotation.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"  # kubelet 1.20's default --pod-infra-container-image
BUSYBOX_IMAGE = "docker.io/library/busybox:bw-test"


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(info)


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 0
    tar.addfile(info)


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def oci_archive(path: Path, name: str, layer: bytes, config: dict) -> Path:
    """Write an OCI image layout archive with one uncompressed ``layer`` and ``config`` to ``path``."""
    layer_digest, _ = _blob(layer)
    image_config = {
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},  # uncompressed: digest == diff_id
        "history": [{"created_by": "botwarden tests/k8s/images.py"}],
    }
    config_digest, config_bytes = _blob(json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}],
    }
    manifest_digest, manifest_bytes = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": len(manifest_bytes),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}],
    }
    with tarfile.open(path, "w") as tar:
        _add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_file(tar, "index.json", json.dumps(index).encode())
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for digest, data in ((layer_digest, layer), (config_digest, config_bytes),
                             (manifest_digest, manifest_bytes)):
            _add_file(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    return path


def _layer(build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def pause_image(path: Path, pause_binary: Path) -> Path:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "pause", pause_binary.read_bytes(), 0o755)
    return oci_archive(path, PAUSE_IMAGE, _layer(build), {"Entrypoint": ["/pause"]})


def busybox_image(path: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    """busybox-static at /bin/busybox plus a symlink per applet (sh, nc, httpd, cat, ...)."""
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()

    def build(tar: tarfile.TarFile) -> None:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root", "www"):
            _add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        _add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "bin/busybox":
                _add_symlink(tar, applet, "/bin/busybox")
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        _add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return oci_archive(path, BUSYBOX_IMAGE, _layer(build),
                       {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/"})
