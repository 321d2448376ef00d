"""Shared fixtures: real PostgreSQL and OpenBao servers, started once per session."""

from __future__ import annotations

import os

import pytest

from tests.servers import OpenBaoServer, PostgresServer


def pytest_collection_modifyitems(config, items):
    # Tests marked `root` need root on this kind of machine. CI runs as root, so
    # they never skip there; elsewhere they skip and say why.
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI must run as root: root-marked tests may not skip in CI")
    skip = pytest.mark.skip(reason="needs root (eBPF, cgroups, network namespaces); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_server():
    # Prepared transactions on: the client-fidelity tests run two-phase commit direct and through botwarden.
    server = PostgresServer(ssl=True, extra_conf={"max_prepared_transactions": "10"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bao_server():
    server = OpenBaoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kube():
    """A real etcd + kube-apiserver 1.20.2 on loopback (tests/k8s/cluster.py; built once per machine)."""
    from tests.k8s.cluster import KubeCluster

    cluster = KubeCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_node(kube):
    """A real kubelet + containerd node joined to ``kube`` (tests/k8s/node.py); pods run on it."""
    from tests.k8s.node import KubeNode

    node = KubeNode(kube).start()
    try:
        yield node
    finally:
        node.stop()
