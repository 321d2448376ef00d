"""nftables fallback: the same redirect as eBPF, attribution from the socket owner.

'auto' picks it when eBPF cannot attach.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import probes
from probes import cgroups, loader, nft
from tests.probes_fixtures import BOT_PYTHON, Relay, TargetNet, exe_identity, free_port, run_bot, tcp, unique

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

P_REG, P_UNREG = 5432, 6432
NOBODY = 65534


@pytest.fixture(scope="module")
def net():
    n = TargetNet().start()
    try:
        yield n
    finally:
        n.stop()


P_PASS = 7432


def _settings(net: TargetNet, lport: int, mode: str) -> probes.ProbeSettings:
    return probes.ProbeSettings(
        cgroup_parent=unique("bw-test-"),
        targets=[(net.ip4, P_REG, "127.0.0.1", lport)],
        passthrough=[(net.ip4, P_PASS)],
        pin_dir=f"/sys/fs/bpf/{unique('botwarden-test-')}",
        nft_table=unique("bwtest_"),
        mode=mode,
        unix_sockets="unfiltered",  # nftables cannot filter them: the explicit opt-out
    )


def test_nftables_refuses_to_attach_unless_unix_sockets_are_explicitly_unfiltered(net):
    settings = probes.ProbeSettings(**{**_settings(net, free_port(), "nftables").__dict__,
                                       "unix_sockets": "filter"})
    try:
        with pytest.raises(probes.ProbeUnavailable, match="Unix-socket connections cannot be filtered: the "
                           "nftables path .*unix_sockets = \"unfiltered\""):
            probes.attach(settings)
        assert not nft.installed(settings.nft_table)
    finally:
        cgroups.remove(settings.cgroup_parent)


def _tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def test_nftables_fallback_redirects_and_attributes(net):
    lport = free_port()
    settings = _settings(net, lport, "nftables")
    relay = None
    try:
        handle = probes.attach(settings)
        assert handle.path == "nftables" and handle.reason == "mode=nftables"
        relay = Relay(lport, pin_dir=settings.pin_dir, nft_table=settings.nft_table)
        bot_cg = cgroups.bot_cgroup(settings.cgroup_parent, "bot-n")
        bot = run_bot(bot_cg, [tcp(net.ip4, P_REG), tcp(f"::ffff:{net.ip4}", P_REG, "6"), tcp(net.ip4, P_UNREG),
                               tcp(net.ip4, P_PASS)])
        direct, mapped, denied, passthrough = bot.results
        assert passthrough["reply"] == f"target:{P_PASS}:hello\n"
        assert direct["reply"] == f"via-listener|target:{P_REG}:hello\n"
        assert mapped["reply"] == f"via-listener|target:{P_REG}:hello\n"
        assert denied["errno"] == "EHOSTUNREACH"  # nftables rejects (admin-prohibited), it cannot say EPERM
        attr = relay.seen[(direct["sockname"][0], direct["sockname"][1])]
        exe, ino, dev = exe_identity(BOT_PYTHON)
        assert attr is not None and attr.source == "nftables"
        assert attr.original_dst == (net.ip4, P_REG)
        assert attr.tgid == bot.pid and (attr.uid, attr.gid) == (NOBODY, NOBODY)
        assert attr.cgroup_path == cgroups.relative(bot_cg) and attr.cgroup_id == os.stat(bot_cg).st_ino
        assert (attr.exe_path, attr.exe_inode, attr.exe_dev) == (exe, ino, dev)
        # Outside the watched cgroup nothing changes.
        outside = run_bot(None, [tcp(net.ip4, P_REG), tcp(net.ip4, P_UNREG)])
        assert [r["reply"] for r in outside.results] == [f"target:{P_REG}:hello\n", f"target:{P_UNREG}:hello\n"]
        st = probes.status(settings)
        assert st.path == "nftables" and st.nft_table and st.owner_alive and "mode=nftables" in st.reason
    finally:
        if relay is not None:
            relay.stop()
        result = probes.detach(settings)
        cgroups.remove(settings.cgroup_parent)
    assert result.nft_table
    assert settings.nft_table not in _tables()
    assert probes.status(settings).path == "none"


_FOREIGN = rb"""
int other_connect4(struct bpf_sock_addr *ctx) { return 1; }
"""


def test_auto_falls_back_to_nftables_when_the_cgroup_hook_is_taken(net):
    # Another tool already attached a multi-program connect4 hook to the bots' cgroup:
    # our exclusive attach fails, and 'auto' must fall back (and say why) instead of leaving bots open.
    from bcc import BPF  # noqa: PLC0415

    lport = free_port()
    settings = _settings(net, lport, "auto")
    cg = cgroups.create(settings.cgroup_parent)
    foreign = BPF(text=_FOREIGN)
    fn = foreign.load_func(b"other_connect4", loader.PROG_TYPE_CGROUP_SOCK_ADDR,
                           attach_type=loader.ATTACH_INET4_CONNECT)
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    relay = None
    try:
        BPF.attach_func(fn, cg_fd, loader.ATTACH_INET4_CONNECT, 2)  # BPF_F_ALLOW_MULTI
        handle = probes.attach(settings)
        assert handle.path == "nftables"
        assert handle.reason.startswith("eBPF unavailable: attaching connect4")
        relay = Relay(lport, pin_dir=settings.pin_dir, nft_table=settings.nft_table)
        bot = run_bot(cgroups.bot_cgroup(settings.cgroup_parent, "bot-auto"), [tcp(net.ip4, P_REG)])
        assert bot.results[0]["reply"] == f"via-listener|target:{P_REG}:hello\n"
        st = probes.status(settings)
        assert st.path == "nftables" and "eBPF unavailable" in st.reason
        assert not Path(settings.pin_dir).exists()  # nothing half-attached left behind
    finally:
        if relay is not None:
            relay.stop()
        BPF.detach_func(fn, cg_fd, loader.ATTACH_INET4_CONNECT)
        os.close(cg_fd)
        foreign.cleanup()
        probes.detach(settings)
        cgroups.remove(settings.cgroup_parent)
