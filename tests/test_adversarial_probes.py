"""Adversarial: a bot trying to get around the probes, against real programs on this kernel.

Each case asserts the refusal the bot sees and the probe event that records it (the daemon
turns these events into ``probes`` audit rows; test_adversarial_daemon.py checks the rows).
Covered here: Unix sockets (path, abstract, datagram, literal-path tricks, user namespaces),
cgroup escapes (non-root refused; root detected, and killed when configured; clone3 into
another cgroup), ``unshare -n`` and raw sockets from a user namespace, io_uring connect.
The IPv4/IPv6/v4-mapped/UDP/TFO/MPTCP/SCTP cases live in test_probes_ebpf.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import probes
from probes import cgroups
from tests.probes_fixtures import (
    BOT_PYTHON,
    BOT_SCRIPT,
    Relay,
    TargetNet,
    free_port,
    run_bot,
    UnixEcho,
    tcp,
    unique,
    unix,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

P_REG, P_UNREG = 5432, 6432
NOBODY = 65534


@dataclass
class Env:
    net: TargetNet
    settings: probes.ProbeSettings
    handle: probes.ProbeHandle
    relay: Relay
    bot_cg: Path
    sockdir: Path


def _settings(net: TargetNet, lport: int, **extra) -> probes.ProbeSettings:
    return probes.ProbeSettings(
        cgroup_parent=unique("bw-adv-"),
        targets=[(net.ip4, P_REG, "127.0.0.1", lport)],
        pin_dir=f"/sys/fs/bpf/{unique('botwarden-adv-')}",
        nft_table=unique("bwadv_"),
        mode="ebpf",
        **extra,
    )


def _cleanup(settings, handle=None, *relays) -> None:
    for r in relays:
        if r is not None:
            r.stop()
    if handle is not None:
        handle.close()
    if settings is not None:
        probes.detach(settings)
        cgroups.remove(settings.cgroup_parent)


@pytest.fixture(scope="module")
def net():
    n = TargetNet().start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def env(net):
    sockdir = Path(tempfile.mkdtemp(prefix="bw-adv-sock-"))
    os.chmod(sockdir, 0o755)
    allowed, abstract = str(sockdir / "allowed.sock"), "@" + unique("bw-adv-allowed-")
    lport = free_port()
    settings = _settings(net, lport, unix_allow=(allowed, abstract, str(sockdir / "allowed.dgram")))
    handle = relay = None
    try:
        handle = probes.attach(settings)
        relay = Relay(lport, pin_dir=settings.pin_dir)
        yield Env(net, settings, handle, relay, cgroups.bot_cgroup(settings.cgroup_parent, "bot"), sockdir)
    finally:
        _cleanup(settings, handle, relay)
        shutil.rmtree(sockdir, ignore_errors=True)


def _drain(handle: probes.ProbeHandle) -> list[probes.ProbeEvent]:
    events: list[probes.ProbeEvent] = []
    while handle.poll_events(events.append, 0):
        pass
    return events


def _events_of(handle: probes.ProbeHandle, pid: int, want: int = 1) -> list[probes.ProbeEvent]:
    got: list[probes.ProbeEvent] = []

    def more() -> bool:
        got.extend(e for e in _drain(handle) if e.pid == pid)
        return len(got) >= want

    wait_for(more)
    return got


# -- Unix sockets -----------------------------------------------------------------------------
def test_unix_socket_not_allowed_is_refused_and_reported(env):
    """The finding of issue 26: a bot reached a local socket past the inspector."""
    srv = UnixEcho(str(env.sockdir / "db.sock"), "db")
    try:
        _drain(env.handle)
        outside = run_bot(None, [unix(str(env.sockdir / "db.sock"))])  # not a bot: unaffected
        assert outside.results[0]["reply"] == "unix:db:hello\n"
        bot = run_bot(env.bot_cg, [unix(str(env.sockdir / "db.sock"))])
        assert bot.results == [{"errno": "EPERM"}]
        [ev] = _events_of(env.handle, bot.pid)
        assert ev.event == "denied_connect" and ev.family == "unix"
        assert ev.dst_addr == str(env.sockdir / "db.sock") and ev.dst_port is None
        assert ev.uid == NOBODY and ev.cgroup_path == cgroups.relative(env.bot_cg)
        assert ev.detail == "Unix socket not in probes.unix_allow"
    finally:
        srv.close()


def test_allow_listed_unix_paths_work_and_only_as_spelled(env):
    allowed = env.sockdir / "allowed.sock"
    srv = UnixEcho(str(allowed), "allowed")
    link = env.sockdir / "link.sock"
    link.symlink_to(allowed)
    try:
        _drain(env.handle)
        bot = run_bot(env.bot_cg, [
            unix(str(allowed)),
            # Spelled differently, the same socket is refused: the allow-list is literal, so no
            # symlink, '..' or relative path the bot controls can make another socket look allowed.
            unix(str(link)),
            unix(str(env.sockdir / "x" / ".." / "allowed.sock")),
            unix(str(allowed) + "\0trailing bytes after the NUL"),  # the kernel stops at the NUL
        ])
        assert [r.get("reply") or r.get("errno") for r in bot.results] == [
            "unix:allowed:hello\n", "EPERM", "EPERM", "unix:allowed:hello\n"]
        denied = _events_of(env.handle, bot.pid, want=2)
        assert sorted(e.dst_addr for e in denied) == sorted([str(link), str(env.sockdir / "x/../allowed.sock")])
    finally:
        srv.close()
        link.unlink()


def test_unix_allow_changes_without_reloading_the_programs(env):
    extra = env.sockdir / "added.sock"
    srv = UnixEcho(str(extra), "added")
    try:
        assert run_bot(env.bot_cg, [unix(str(extra))]).results == [{"errno": "EPERM"}]
        env.handle.update_targets(dataclasses.replace(env.settings, unix_allow=env.settings.unix_allow + (str(extra),)))
        assert run_bot(env.bot_cg, [unix(str(extra))]).results == [{"reply": "unix:added:hello\n"}]
    finally:
        env.handle.update_targets(env.settings)
        srv.close()
    # Off the list again: refused before the kernel even looks the path up (it is gone: ENOENT otherwise).
    assert run_bot(env.bot_cg, [unix(str(extra))]).results == [{"errno": "EPERM"}]
    _drain(env.handle)


def test_a_unix_socket_target_lands_on_the_inspector(env):
    """Issue 26.1: a Unix-socket target. A bot's connect to the database's socket path is
    rewritten in the kernel (connect_unix, kfunc bpf_sock_addr_set_sun_path) to the inspector's
    socket; processes outside the bots' cgroups still reach the database's own socket; the same
    socket under another spelling stays refused; a sendmsg to it (datagram) is refused."""
    db, inspector = env.sockdir / "pg.sock", env.sockdir / "inspector.sock"
    real, front = UnixEcho(str(db), "db"), UnixEcho(str(inspector), "inspector")
    link = env.sockdir / "pg-link.sock"
    link.symlink_to(db)
    with_target = dataclasses.replace(env.settings, unix_targets=((str(db), str(inspector)),))
    try:
        assert run_bot(env.bot_cg, [unix(str(db))]).results == [{"errno": "EPERM"}]  # no target yet
        _drain(env.handle)
        env.handle.update_targets(with_target)
        bot = run_bot(env.bot_cg, [unix(str(db)), unix(str(link))])
        assert [r.get("reply") or r.get("errno") for r in bot.results] == ["unix:inspector:hello\n", "EPERM"]
        events = _events_of(env.handle, bot.pid, want=2)
        assert [(e.event, e.dst_addr) for e in events] == [("redirected", str(db)), ("denied_connect", str(link))]
        outside = run_bot(None, [unix(str(db))])
        assert outside.results[0]["reply"] == "unix:db:hello\n"
    finally:
        env.handle.update_targets(env.settings)
        real.close()
        front.close()
        link.unlink()
    assert run_bot(env.bot_cg, [unix(str(db))]).results == [{"errno": "EPERM"}]  # target gone: refused again
    _drain(env.handle)


def test_abstract_and_datagram_unix_addresses(env):
    abstract = next(a for a in env.settings.unix_allow if a.startswith("@"))
    other = "@" + unique("bw-adv-other-")
    servers = [UnixEcho(abstract, "abs"), UnixEcho(other, "other"),
               UnixEcho(str(env.sockdir / "allowed.dgram"), "dg", socket.SOCK_DGRAM),
               UnixEcho(str(env.sockdir / "other.dgram"), "dg2", socket.SOCK_DGRAM)]
    try:
        _drain(env.handle)
        bot = run_bot(env.bot_cg, [unix(abstract), unix(other), unix(abstract + "x"),
                                   unix(str(env.sockdir / "allowed.dgram"), "dgram"),
                                   unix(str(env.sockdir / "other.dgram"), "dgram")])
        assert [r.get("reply") or r.get("sent") or r.get("errno") for r in bot.results] == [
            "unix:abs:hello\n", "EPERM", "EPERM", True, "EPERM"]
        assert wait_for(lambda: servers[2].received == [b"x"]) and servers[3].received == []
        denied = _events_of(env.handle, bot.pid, want=3)
        assert sorted(e.dst_addr for e in denied) == sorted([other, abstract + "x", str(env.sockdir / "other.dgram")])
    finally:
        for s in servers:
            s.close()


def test_unix_sockets_from_a_user_namespace_are_refused(env):
    """In a user namespace a bot could chroot or bind-mount another socket over an allowed path."""
    allowed = env.sockdir / "allowed.sock"
    srv = UnixEcho(str(allowed), "allowed")
    try:
        _drain(env.handle)
        bot = run_bot(env.bot_cg, [unix(str(allowed))], wrap=("unshare", "--user", "--map-root-user"))
        assert bot.results == [{"errno": "EPERM"}]
        [ev] = _events_of(env.handle, bot.pid)
        assert ev.family == "unix" and ev.detail == "Unix socket from inside a user namespace"
    finally:
        srv.close()


# -- daemonized children -------------------------------------------------------------------------
def test_double_forked_daemonized_child_is_still_redirected_and_attributed(env):
    """A bot that daemonizes (fork, setsid, the parent exits: the child is reparented) stays in its
    cgroup: its connection is redirected and attributed to it, not to the long-gone parent."""
    out = env.sockdir / f"{unique('daemonized-')}.json"
    out.touch(mode=0o666)
    out.chmod(0o666)
    attempts = json.dumps([tcp(env.net.ip4, P_REG), tcp(env.net.ip4, P_UNREG)])
    script = '( setsid /usr/bin/python3 -c "$BOT" "$ATTEMPTS" > "$OUT" & ) ; exit 0'
    sh = cgroups.spawn(env.bot_cg, ["/bin/sh", "-c", script], user="nobody",
                       env={"PATH": "/usr/bin:/bin", "BOT": BOT_SCRIPT, "ATTEMPTS": attempts, "OUT": str(out)})
    assert sh.wait(timeout=30) == 0
    try:
        report = json.loads(wait_for(lambda: out.read_text().strip(), timeout=30))
        assert report["pid"] != sh.pid
        ok, denied = report["results"]
        assert ok["reply"] == f"via-listener|target:{P_REG}:hello\n" and denied == {"errno": "EPERM"}
        attr = env.relay.seen.get((ok["sockname"][0].removeprefix("::ffff:"), ok["sockname"][1]))
        assert attr is not None and attr.tgid == report["pid"] and attr.uid == NOBODY
        assert attr.cgroup_path == cgroups.relative(env.bot_cg)
    finally:
        out.unlink(missing_ok=True)


# -- namespaces and socket types ----------------------------------------------------------------
def test_unshare_net_and_raw_sockets_stay_under_the_hooks(env):
    """A non-root bot in its own user+network namespace holds CAP_NET_RAW there; the cgroup hooks
    do not care about network namespaces: unregistered destinations and raw sockets get EPERM."""
    _drain(env.handle)
    bot = run_bot(env.bot_cg, [
        tcp(env.net.ip4, P_UNREG),
        {"family": "4", "ip": env.net.ip4, "port": 0, "proto": "raw"},
        tcp(env.net.ip4, P_REG),  # redirected to 127.0.0.1:<listener>, which this namespace lacks
    ], wrap=("unshare", "--user", "--map-root-user", "--net"))
    assert [r.get("errno") for r in bot.results[:2]] == ["EPERM", "EPERM"]
    assert bot.results[2].get("errno") in ("ECONNREFUSED", "ENETUNREACH")
    events = _events_of(env.handle, bot.pid, want=2)
    assert {e.detail.split(":")[0] for e in events if e.event == "denied_connect"} == {
        "not a registered target", "socket type not allowed (only TCP and UDP)"}


def test_io_uring_connect_meets_the_same_hooks(env):
    """IORING_OP_CONNECT runs the kernel's connect path (and its cgroup hooks) for the bot's socket."""
    allowed = env.sockdir / "allowed.sock"
    srv = UnixEcho(str(allowed), "allowed")
    try:
        _drain(env.handle)
        bot = run_bot(env.bot_cg, [
            {**tcp(env.net.ip4, P_REG), "uring": True},
            {**tcp(env.net.ip4, P_UNREG), "uring": True},
            {**tcp(env.net.ip6, P_UNREG), "uring": True},
            {**unix(str(allowed)), "uring": True},
            {**unix(str(env.sockdir / "db.sock")), "uring": True},
        ])
        assert [r.get("reply") or r.get("errno") for r in bot.results] == [
            f"via-listener|target:{P_REG}:hello\n", "EPERM", "EPERM", "unix:allowed:hello\n", "EPERM"]
        denied = _events_of(env.handle, bot.pid, want=3)
        assert sorted((e.family, e.dst_port) for e in denied if e.event == "denied_connect") == [
            ("ipv4", P_UNREG), ("ipv6", P_UNREG), ("unix", None)]
    finally:
        srv.close()


# -- cgroup escapes ---------------------------------------------------------------------------
def _escape_script(root: Path, then: str) -> list[str]:
    return ["/bin/sh", "-c", f'echo $$ > {root}/cgroup.procs && {then}']


def test_non_root_bot_cannot_leave_its_cgroup(env):
    root = cgroups.cgroup2_mount()
    proc = cgroups.spawn(env.bot_cg, _escape_script(root, "echo escaped"), user="nobody",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "escaped" not in out and "Permission denied" in err
    assert not [e for e in _drain(env.handle) if e.event == "left_cgroup"]


def test_root_bot_leaving_its_cgroup_is_detected(env):
    """A root bot can move itself to the root cgroup (then nothing filters it): it is reported."""
    root = cgroups.cgroup2_mount()
    _drain(env.handle)
    attempts = json.dumps([tcp(env.net.ip4, P_UNREG)])
    proc = cgroups.spawn(env.bot_cg, _escape_script(root, f'exec {BOT_PYTHON} -c "$BOT" "$ATTEMPTS"'),
                         env={**os.environ, "BOT": BOT_SCRIPT, "ATTEMPTS": attempts},
                         stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"target:{P_UNREG}:hello" in out  # it escaped: why detection matters
    [ev] = [e for e in _events_of(env.handle, proc.pid) if e.event == "left_cgroup"]
    assert ev.uid == 0 and ev.cgroup_path == cgroups.relative(env.bot_cg) and ev.dst_addr == "/"
    assert ev.comm == "sh" and ev.detail == f"moved from {cgroups.relative(env.bot_cg)} to /"
    assert ev.as_record()["event"] == "left_cgroup"


# clone3(CLONE_INTO_CGROUP) with the cgroup's fd: the child starts in another cgroup, no move.
CLONE_INTO_CGROUP = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
cgfd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
args = ctypes.create_string_buffer(struct.pack("<11Q", 0x200000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, cgfd), 88)
pid = libc.syscall(435, args, 88)
if pid == 0:
    libc.syscall(34)  # the child: pause() until the test kills it
    libc.syscall(60, 0)
print(pid if pid > 0 else -ctypes.get_errno(), flush=True)
"""


def test_root_bot_forking_into_another_cgroup_is_detected(env):
    _drain(env.handle)
    proc = cgroups.spawn(env.bot_cg, [BOT_PYTHON, "-c", CLONE_INTO_CGROUP, str(cgroups.cgroup2_mount())],
                         stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert child > 0
        assert Path(f"/proc/{child}/cgroup").read_text().splitlines()[-1] == "0::/"
        [ev] = [e for e in _events_of(env.handle, child) if e.event == "left_cgroup"]
        assert ev.cgroup_path == cgroups.relative(env.bot_cg) and ev.dst_addr == "/" and ev.uid == 0
        assert ev.detail == (f"moved from {cgroups.relative(env.bot_cg)} to /: forked straight into another "
                             "cgroup (clone3 CLONE_INTO_CGROUP)")
    finally:
        os.kill(child, 9)
        proc.wait()


def test_escaped_root_bot_is_killed_when_configured(net):
    lport = free_port()
    settings = _settings(net, lport, kill_escaped=True)
    handle = None
    try:
        handle = probes.attach(settings)
        bot_cg = cgroups.bot_cgroup(settings.cgroup_parent, "bot")
        root = cgroups.cgroup2_mount()
        proc = cgroups.spawn(bot_cg, _escape_script(root, "echo escaped"), stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -9 and out == ""  # killed inside its write(), before 'echo'
        [ev] = [e for e in _events_of(handle, proc.pid) if e.event == "left_cgroup"]
        assert ev.detail.endswith("killed (probes.kill_escaped)")
        # A child of a bot forked before is tracked too; moving it from outside is reported, and the
        # daemon side kills it by pid (the kernel program can only signal the task that moved).
        child = cgroups.spawn(bot_cg, ["/bin/sleep", "60"])
        (root / "cgroup.procs").write_text(str(child.pid))
        [ev2] = [e for e in _events_of(handle, child.pid) if e.event == "left_cgroup"]  # kills it
        assert ev2.detail.endswith("killed (probes.kill_escaped)")
        assert child.wait(timeout=10) == -9
    finally:
        _cleanup(settings, handle)


def test_bots_started_before_the_probes_are_watched_too(net):
    lport = free_port()
    settings = _settings(net, lport)
    handle = None
    bot_cg = cgroups.bot_cgroup(settings.cgroup_parent, "early")
    early = cgroups.spawn(bot_cg, ["/bin/sleep", "60"])
    try:
        handle = probes.attach(settings)  # the loader enters the bots already running
        (cgroups.cgroup2_mount() / "cgroup.procs").write_text(str(early.pid))
        [ev] = [e for e in _events_of(handle, early.pid) if e.event == "left_cgroup"]
        assert ev.cgroup_path == cgroups.relative(bot_cg) and ev.comm == "sleep"
    finally:
        early.kill()
        early.wait()
        _cleanup(settings, handle)


# -- kernels without the AF_UNIX hooks ------------------------------------------------------------
def test_without_unix_hooks_attach_refuses_loudly_unless_unfiltered(net, monkeypatch, caplog):
    from probes import btf, lifecycle

    before_6_7 = dataclasses.replace(
        btf.kernel_features(), unix_offsets=None,
        unix_missing="the kernel has no cgroup hooks for Unix sockets (BPF_CGROUP_UNIX_CONNECT, Linux 6.7+)")
    monkeypatch.setattr(lifecycle, "kernel_features", lambda: before_6_7)
    settings = _settings(net, free_port())
    try:
        with pytest.raises(probes.ProbeUnavailable, match=r"Unix-socket connections cannot be filtered: the kernel "
                           r"has no cgroup hooks .*Linux 6.7\+.*set probes.unix_sockets = \"unfiltered\""):
            probes.attach(settings)
        assert "Refusing to attach" in caplog.text  # logged at error level too
        assert probes.status(settings).path == "none"  # nothing half-installed
    finally:
        _cleanup(settings)
    # The operator's explicit opt-out: attached without the Unix hooks, and Unix sockets are open.
    sockdir = Path(tempfile.mkdtemp(prefix="bw-adv-sock-"))
    os.chmod(sockdir, 0o755)
    settings = _settings(net, free_port(), unix_sockets="unfiltered")
    handle = srv = None
    try:
        handle = probes.attach(settings)
        st = probes.status(settings)
        assert st.path == "ebpf" and "partially" not in st.reason
        assert not {p.hook for p in st.programs} & {"connect_unix", "sendmsg_unix"}
        srv = UnixEcho(str(sockdir / "db.sock"), "db")
        bot = run_bot(cgroups.bot_cgroup(settings.cgroup_parent, "bot"), [unix(str(sockdir / "db.sock"))])
        assert bot.results == [{"reply": "unix:db:hello\n"}]
    finally:
        if srv is not None:
            srv.close()
        _cleanup(settings, handle)
        shutil.rmtree(sockdir, ignore_errors=True)
