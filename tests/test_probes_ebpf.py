"""eBPF redirect, deny-by-default and attribution, against real programs on this kernel.

One program set is loaded for the module (``env``); tests that restart, kill
or detach the owner get their own cgroup and pin directory. Everything the
tests create (namespaces, cgroups, programs, pins) is removed even on failure.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import probes
from probes import bpfsys, cgroups, loader, records
from tests.probes_fixtures import (
    BOT_PYTHON,
    BOT_SCRIPT,
    Relay,
    TargetNet,
    bpftool_json,
    exe_identity,
    free_port,
    quiet_port,
    run_bot,
    tcp,
    unique,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

P_REG, P_UNREG, P_HOLD = 5432, 6432, 7432
ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

CONTRACT_PROBE_FIELDS = {
    "ts", "event", "pid", "uid", "gid", "cgroup_id", "cgroup_path", "comm", "exe",
    "dst_addr", "dst_port", "family", "detail",
}


@dataclass
class Env:
    net: TargetNet
    settings: probes.ProbeSettings
    handle: probes.ProbeHandle
    relay: Relay
    hold_relay: Relay
    bot_cg: Path


def _cleanup(settings: probes.ProbeSettings | None, handle=None, *relays) -> None:
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


def _settings(net: TargetNet, lport: int, **extra) -> probes.ProbeSettings:
    return probes.ProbeSettings(
        cgroup_parent=unique("bw-test-"),
        targets=[(net.ip4, P_REG, "127.0.0.1", lport), (net.ip6, P_REG, "127.0.0.1", lport)],
        pin_dir=f"/sys/fs/bpf/{unique('botwarden-test-')}",
        nft_table=unique("bwtest_"),
        mode="ebpf",
        **extra,
    )


@pytest.fixture(scope="module")
def env(net):
    lport, hport = free_port(), free_port()
    settings = _settings(net, lport)
    settings = probes.ProbeSettings(
        **{**settings.__dict__, "targets": settings.targets + (probes.Target(net.ip4, P_HOLD, "127.0.0.1", hport),)}
    )
    handle = relay = hold_relay = None
    try:
        handle = probes.attach(settings)
        relay = Relay(lport, pin_dir=settings.pin_dir)
        hold_relay = Relay(hport, name="hold", pin_dir=settings.pin_dir)
        hold_relay.hold = True
        yield Env(net, settings, handle, relay, hold_relay, cgroups.bot_cgroup(settings.cgroup_parent, "bot-a"))
    finally:
        _cleanup(settings, handle, relay, hold_relay)


def _drain(handle: probes.ProbeHandle) -> list[probes.ProbeEvent]:
    events: list[probes.ProbeEvent] = []
    while handle.poll_events(events.append, 0):
        pass
    return events


def _seen(relay: Relay, sockname: list) -> probes.Attribution | None:
    ip = sockname[0].removeprefix("::ffff:")
    return relay.seen.get((ip, sockname[1]))


def test_redirect_lands_in_listener_with_kernel_attribution(env):
    _drain(env.handle)
    bot = run_bot(env.bot_cg, [tcp(env.net.ip4, P_REG)])
    [res] = bot.results
    # The listener relayed over its own upstream connection and reached the real target:
    # the inspector's upstream is not redirected.
    assert res["reply"] == f"via-listener|target:{P_REG}:hello\n"
    assert res["peer"] == [env.net.ip4, P_REG]  # getpeername4: the bot sees what it asked for
    attr = _seen(env.relay, res["sockname"])
    assert attr is not None
    exe, ino, dev = exe_identity(BOT_PYTHON)
    assert attr.source == "ebpf"
    assert attr.original_dst == (env.net.ip4, P_REG)
    assert attr.tgid == bot.pid and attr.pid == bot.pid
    assert (attr.uid, attr.gid) == (NOBODY, NOBODY)
    assert attr.cgroup_id == os.stat(env.bot_cg).st_ino
    assert attr.cgroup_path == cgroups.relative(env.bot_cg)
    assert attr.comm == Path(BOT_PYTHON).name  # comm comes from the exec'd file name
    assert (attr.exe_inode, attr.exe_dev, attr.exe_path) == (ino, dev, exe)
    assert attr.start_time_ns > 0
    assert attr.audit_fields()["pid"] == bot.pid
    events: list[probes.ProbeEvent] = []
    assert wait_for(lambda: events.extend(_drain(env.handle)) or any(e.pid == bot.pid for e in events))
    [redirected] = [e for e in events if e.pid == bot.pid]
    assert redirected.event == "redirected"
    assert (redirected.dst_addr, redirected.dst_port, redirected.family) == (env.net.ip4, P_REG, "ipv4")
    assert redirected.cgroup_path == attr.cgroup_path and redirected.uid == NOBODY


def test_records_are_dropped_when_the_connection_closes(env):
    # A stale record would attribute a later connection that reuses the same addresses
    # (say, a process outside the bots' cgroups binding the bot's old source port) to the bot.
    port = quiet_port()
    bot = run_bot(env.bot_cg, [{**tcp(env.net.ip4, P_REG), "reuseaddr": True, "src_port": port}])
    sockname = bot.results[0]["sockname"]
    assert sockname == ["127.0.0.1", port]
    lport = env.settings.targets[0].listener_port
    fd = bpfsys.obj_get(f"{env.settings.pin_dir}/by_tuple")
    try:
        key = records.tuple_key(("127.0.0.1", lport), tuple(sockname))
        assert wait_for(lambda: not bpfsys.map_lookup(fd, key, records.Origin()))
    finally:
        os.close(fd)
    # The bot's socket set SO_REUSEADDR, so its leftover (TIME_WAIT for 60 s if the bot closed
    # first on a loaded machine) does not block the bind, and its port is one no other connection
    # on the machine is given. The connect can still meet the leftover until the relay closes its
    # end or loopback's TIME_WAIT reuse allows it (EADDRNOTAVAIL): retry that briefly.
    deadline = time.monotonic() + 20
    while True:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(tuple(sockname))
            s.settimeout(5)
            s.connect(("127.0.0.1", lport))
            break
        except OSError as e:
            s.close()
            if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with s:
        assert s.recv(100) == b"no-attribution\n"
    assert env.relay.seen[tuple(sockname)] is None


def test_unregistered_destinations_are_denied_and_reported(env):
    _drain(env.handle)
    lport = env.settings.targets[0].listener_port
    attempts = [tcp(env.net.ip4, P_UNREG), tcp(env.net.host_ip4, P_REG), tcp("127.0.0.1", lport)]
    bot = run_bot(env.bot_cg, attempts)
    assert [r.get("errno") for r in bot.results] == ["EPERM", "EPERM", "EPERM"]
    readable, _, _ = select.select([env.handle.fileno()], [], [], 5)  # asyncio can wait on this fd
    assert readable == [env.handle.fileno()]
    # The same unregistered port answers a process outside the watched cgroup: the denial is the probe's.
    outside = run_bot(None, [tcp(env.net.ip4, P_UNREG)])
    assert outside.results[0]["reply"] == f"target:{P_UNREG}:hello\n"

    events: list[probes.ProbeEvent] = []

    def got_all():
        events.extend(_drain(env.handle))
        return len([e for e in events if e.event == "denied_connect" and e.pid == bot.pid]) >= 3

    assert wait_for(got_all)
    denied = [e for e in events if e.event == "denied_connect" and e.pid == bot.pid]
    assert {(e.dst_addr, e.dst_port) for e in denied} == {
        (env.net.ip4, P_UNREG), (env.net.host_ip4, P_REG), ("127.0.0.1", lport)}
    for e in denied:
        rec = e.as_record()
        assert set(rec) <= CONTRACT_PROBE_FIELDS and {"ts", "event"} <= set(rec)
        assert rec["ts"].tzinfo is not None
        assert (rec["uid"], rec["gid"], rec["family"]) == (NOBODY, NOBODY, "ipv4")
        assert rec["cgroup_id"] == os.stat(env.bot_cg).st_ino
        assert rec["cgroup_path"] == cgroups.relative(env.bot_cg)
        assert rec["detail"] == "not a registered target"


def test_ipv6_and_v4_mapped_are_denied_unless_registered(env):
    ip4, ip6 = env.net.ip4, env.net.ip6
    mapped = f"::ffff:{ip4}"
    bot = run_bot(env.bot_cg, [tcp(mapped, P_REG, "6"), tcp(mapped, P_UNREG, "6"), tcp(ip6, P_REG), tcp(ip6, P_UNREG)])
    via_mapped, mapped_unreg, via_v6, v6_unreg = bot.results
    assert via_mapped["reply"] == f"via-listener|target:{P_REG}:hello\n"
    assert via_mapped["peer"] == [mapped, P_REG]  # getpeername6 for a v4-mapped connect
    assert _seen(env.relay, via_mapped["sockname"]).original_dst == (ip4, P_REG)
    assert via_v6["reply"] == f"via-listener|target:{P_REG}:hello\n"
    assert via_v6["peer"] == [ip6, P_REG]
    v6_attr = _seen(env.relay, via_v6["sockname"])
    assert v6_attr.original_dst == (ip6, P_REG) and v6_attr.tgid == bot.pid
    assert mapped_unreg["errno"] == "EPERM" and v6_unreg["errno"] == "EPERM"
    # Both are reachable from outside the watched cgroup.
    outside = run_bot(None, [tcp(mapped, P_UNREG, "6"), tcp(ip6, P_UNREG)])
    assert [r["reply"] for r in outside.results] == [f"target:{P_UNREG}:hello\n"] * 2


def test_udp_to_anything_not_passthrough_is_denied(env):
    bot = run_bot(env.bot_cg, [{"family": "4", "ip": env.net.ip4, "port": P_REG, "proto": "udp"},
                               {"family": "6", "ip": env.net.ip6, "port": 53, "proto": "udp"}])
    assert [r.get("errno") for r in bot.results] == ["EPERM", "EPERM"]
    outside = run_bot(None, [{"family": "4", "ip": env.net.ip4, "port": P_REG, "proto": "udp"}])
    assert outside.results[0] == {"sent": True}


def test_processes_outside_the_watched_cgroup_are_untouched(env):
    before = set(env.relay.seen)
    outside = run_bot(None, [tcp(env.net.ip4, P_REG), tcp(env.net.ip6, P_REG)])
    assert [r["reply"] for r in outside.results] == [f"target:{P_REG}:hello\n"] * 2
    assert set(env.relay.seen) == before


def test_exe_path_withheld_once_the_process_exec_d(env):
    # The bot connects, then execs another binary keeping the socket: the kernel record keeps
    # the connecting executable's inode; /proc now disagrees, so exe_path must be withheld.
    script = (
        "import os, socket\n"
        f"s = socket.create_connection(({env.net.ip4!r}, {P_HOLD}))\n"
        "os.set_inheritable(s.fileno(), True)\n"
        "os.execv('/bin/sleep', ['sleep', '30'])\n"
    )
    proc = cgroups.spawn(env.bot_cg, [BOT_PYTHON, "-c", script], user="nobody")
    try:
        assert wait_for(lambda: os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath("/bin/sleep"))
        assert wait_for(lambda: env.hold_relay.held)
        [conn] = env.hold_relay.held.values()
        attr = probes.lookup(conn, pin_dir=env.settings.pin_dir)
        assert attr is not None and attr.tgid == proc.pid
        _, py_ino, _ = exe_identity(BOT_PYTHON)
        assert attr.exe_inode == py_ino
        assert attr.exe_path is None
        assert attr.original_dst == (env.net.ip4, P_HOLD)
    finally:
        proc.kill()
        proc.wait()


def test_status_reports_ebpf_with_live_owner(env):
    st = probes.status(env.settings)
    assert st.path == "ebpf" and st.owner_alive and not st.fail_closed
    assert st.owner_pid == os.getpid()
    # This kernel (6.18) runs every group: the Unix hooks and the escape watch's pinned links.
    assert {p.hook for p in st.programs} == {short for *_, short in loader.ALL_CGROUP_PROGRAMS}
    assert len(st.programs) == len(loader.ALL_CGROUP_PROGRAMS)
    assert sorted(Path(p).name for p in st.pinned_maps) == sorted(loader.PINNED)
    shown = bpftool_json("cgroup", "show", str(cgroups.resolve(env.settings.cgroup_parent)))
    # Debian 12's bpftool (built for 6.1) does not list the AF_UNIX attach types (6.7+).
    unix_hooks = {short for *_, short in loader.UNIX_PROGRAMS}
    assert {p["id"] for p in shown} == {p.prog_id for p in st.programs if p.hook not in unix_hooks}


_DAEMON = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import probes
from tests.probes_fixtures import Relay
cfg = json.loads(sys.argv[2])
settings = probes.ProbeSettings(**cfg)
handle = probes.attach(settings)
relay = Relay(settings.targets[0].listener_port, name="daemon", pin_dir=settings.pin_dir)
print("READY", flush=True)
time.sleep(3600)
"""


def test_restart_replaces_programs_atomically_with_no_bypass(net):
    lport = free_port()
    settings = _settings(net, lport)
    handle = relay = None
    try:
        handle = probes.attach(settings)
        relay = Relay(lport, pin_dir=settings.pin_dir)
        first = {p.prog_id for p in probes.status(settings).programs}
        bot_cg = cgroups.bot_cgroup(settings.cgroup_parent, "looper")
        attempts = json.dumps([tcp(net.ip4, P_REG)] * 400)
        # The bot keeps connecting while the programs are replaced, again and again, until it is done.
        bot = cgroups.spawn(bot_cg, [BOT_PYTHON, "-c", BOT_SCRIPT, attempts], user="nobody",
                            stdout=subprocess.PIPE, text=True)
        replaced = 0
        while bot.poll() is None and replaced < 20:
            new = probes.attach(settings)
            handle.close()
            handle = new
            replaced += 1
        out, _ = bot.communicate(timeout=60)
        assert replaced >= 1
        replies = [r.get("reply") or r.get("errno") for r in json.loads(out)["results"]]
        assert replies == [f"via-listener|target:{P_REG}:hello\n"] * 400
        st = probes.status(settings)
        assert len(st.programs) == len(loader.ALL_CGROUP_PROGRAMS)
        assert not first & {p.prog_id for p in st.programs}
    finally:
        _cleanup(settings, handle, relay)


def test_daemon_death_fails_closed_then_reattach_then_detach_leaves_nothing(net):
    lport = free_port()
    settings = _settings(net, lport)
    cfg = {k: v for k, v in settings.__dict__.items() if k not in ("targets", "passthrough")}
    cfg["targets"] = [[t.ip, t.port, t.listener_ip, t.listener_port] for t in settings.targets]
    daemon = handle = relay = None
    try:
        daemon = subprocess.Popen([sys.executable, "-c", _DAEMON, str(ROOT), json.dumps(cfg)],
                                  stdout=subprocess.PIPE, text=True)
        assert daemon.stdout.readline().strip() == "READY"
        bot_cg = cgroups.bot_cgroup(settings.cgroup_parent, "bot-b")
        assert run_bot(bot_cg, [tcp(net.ip4, P_REG)]).results[0]["reply"] == f"via-daemon|target:{P_REG}:hello\n"

        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        st = probes.status(settings)
        assert st.path == "ebpf" and not st.owner_alive and st.fail_closed
        assert "fail closed" in st.reason
        assert len(st.programs) == len(loader.ALL_CGROUP_PROGRAMS) and len(st.pinned_maps) == len(loader.PINNED)
        # Programs outlive their owner: bots go to the dead listener, never to the target.
        dead = run_bot(bot_cg, [tcp(net.ip4, P_REG), tcp(net.ip6, P_REG), tcp(net.ip4, P_UNREG)])
        assert [r.get("errno") for r in dead.results] == ["ECONNREFUSED", "ECONNREFUSED", "EPERM"]
        # Nor can a bot take over the free listener port to receive other bots' connections.
        grab = [{"family": "4", "ip": "127.0.0.1", "port": lport, "proto": "bind"},
                {"family": "6", "ip": "::", "port": lport, "proto": "bind"},
                {"family": "4", "ip": "127.0.0.1", "port": 0, "proto": "bind"}]
        grabbed = run_bot(bot_cg, grab).results
        assert [r.get("errno") for r in grabbed[:2]] == ["EPERM", "EPERM"] and "bound" in grabbed[2]
        assert run_bot(None, grab[:1]).results[0]["bound"] == ["127.0.0.1", lport]  # free from outside

        handle = probes.attach(settings)  # the restarted daemon
        relay = Relay(lport, pin_dir=settings.pin_dir)
        # What was refused while the daemon was down is still reported (the ring is pinned).
        events: list[probes.ProbeEvent] = []
        assert wait_for(lambda: handle.poll_events(events.append, 0) >= 0 and any(
            e.event == "denied_connect" and e.pid == dead.pid and e.dst_port == P_UNREG for e in events))
        again = run_bot(bot_cg, [tcp(net.ip4, P_REG)])
        assert again.results[0]["reply"] == f"via-listener|target:{P_REG}:hello\n"
        assert _seen(relay, again.results[0]["sockname"]).tgid == again.pid
        st = probes.status(settings)
        assert st.owner_alive and st.owner_pid == os.getpid()

        ids = {p.prog_id for p in st.programs}
        result = probes.detach(settings)
        assert {p.prog_id for p in result.programs} == ids
        handle.close()
        handle = None
        cgroup = cgroups.resolve(settings.cgroup_parent)
        assert bpftool_json("cgroup", "show", str(cgroup)) == []
        assert not Path(settings.pin_dir).exists()
        assert wait_for(lambda: not ids & {p["id"] for p in bpftool_json("prog", "show")})
        assert probes.status(settings).path == "none"
        # Unwatched now: the bot reaches the target directly.
        free = run_bot(bot_cg, [tcp(net.ip4, P_UNREG)])
        assert free.results[0]["reply"] == f"target:{P_UNREG}:hello\n"
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        _cleanup(settings, handle, relay)


def test_update_targets_and_lookup_from_asyncio(env):
    # A target added at runtime (config reload) is redirected at once; an asyncio server
    # looks the connection up through the transport's socket; removing the target denies again.
    import asyncio
    import threading

    p_new = 8432
    port = free_port()
    seen: list[probes.Attribution | None] = []
    ready = threading.Event()
    stop: list = []

    async def handle(reader, writer):
        attr = probes.lookup(writer.get_extra_info("socket"), pin_dir=env.settings.pin_dir)
        seen.append(attr)
        await reader.readline()
        writer.write(f"asyncio|{attr.tgid}|{attr.original_dst[0]}:{attr.original_dst[1]}".encode())
        await writer.drain()
        writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        stop.append((loop, done))
        ready.set()
        async with server:
            await done

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(5)
    original = env.settings
    grown = probes.ProbeSettings(**{**original.__dict__, "targets": original.targets + (
        probes.Target(env.net.ip4, p_new, "127.0.0.1", port),)})
    try:
        env.handle.update_targets(grown)
        bot = run_bot(env.bot_cg, [tcp(env.net.ip4, p_new)])
        assert bot.results[0]["reply"] == f"asyncio|{bot.pid}|{env.net.ip4}:{p_new}"
        assert seen[0].source == "ebpf" and seen[0].uid == NOBODY
    finally:
        env.handle.update_targets(original)
        loop, done = stop[0]
        loop.call_soon_threadsafe(done.set_result, None)
        thread.join(5)
    assert run_bot(env.bot_cg, [tcp(env.net.ip4, p_new)]).results[0]["errno"] == "EPERM"


def test_fast_open_and_other_socket_types_cannot_bypass(env):
    ip4 = env.net.ip4
    attempts = [
        {"family": "4", "ip": ip4, "port": P_REG, "proto": "tfo"},    # connect implied by sendto(MSG_FASTOPEN)
        {"family": "4", "ip": ip4, "port": P_UNREG, "proto": "tfo"},
        {"family": "4", "ip": ip4, "port": P_UNREG, "proto": "mptcp"},
        {"family": "4", "ip": ip4, "port": P_UNREG, "proto": "udplite"},
    ]
    _drain(env.handle)
    bot = run_bot(env.bot_cg, attempts)
    tfo_reg, tfo_unreg, mptcp, udplite = bot.results
    assert tfo_reg["reply"] == f"via-listener|target:{P_REG}:hello\n"
    assert tfo_unreg["errno"] == "EPERM"
    assert mptcp == {"errno": "EPERM", "at": "socket"} and udplite == {"errno": "EPERM", "at": "socket"}
    # Outside the watched cgroup the same socket types work (the refusal is the probe's).
    outside = run_bot(None, attempts[2:])
    assert outside.results[0]["reply"] == f"target:{P_UNREG}:hello\n"
    assert outside.results[1] == {"sent": True}
    events: list[probes.ProbeEvent] = []
    assert wait_for(lambda: events.extend(_drain(env.handle)) or
                    len([e for e in events if e.pid == bot.pid and e.dst_addr is None]) >= 2)
    refused = [e for e in events if e.pid == bot.pid and e.dst_addr is None]
    assert {e.detail for e in refused} == {"socket type not allowed (only TCP and UDP): protocol 262",
                                           "socket type not allowed (only TCP and UDP): protocol 136"}


def test_run_bot_joins_its_cgroup_before_exec(env):
    # What `botwarden bot run --name NAME -- COMMAND...` calls: the process joins <parent>/<name>
    # and execs in place, so the command's first socket is already watched.
    attempts = json.dumps([tcp(env.net.ip4, P_REG)])
    caller = (
        "import os, sys\n"
        "from probes import cgroups\n"
        "print(os.getpid(), flush=True)\n"
        f"cgroups.run_bot({env.settings.cgroup_parent!r}, 'cli-bot', sys.argv[1:], user='nobody')\n"
    )
    out = subprocess.run([sys.executable, "-c", caller, BOT_PYTHON, "-c", BOT_SCRIPT, attempts],
                         capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.splitlines()
    caller_pid, report = int(out[0]), json.loads(out[1])
    assert report["pid"] == caller_pid  # exec'd in place
    res = report["results"][0]
    assert res["reply"] == f"via-listener|target:{P_REG}:hello\n"
    attr = _seen(env.relay, res["sockname"])
    assert attr.cgroup_path == f"{cgroups.relative(env.settings.cgroup_parent)}/cli-bot"
    assert attr.tgid == caller_pid and attr.uid == NOBODY


def test_passthrough_is_reached_unmodified(env):
    udp = {"family": "4", "ip": env.net.ip4, "port": P_UNREG, "proto": "udp"}
    assert [r.get("errno") for r in run_bot(env.bot_cg, [tcp(env.net.ip4, P_UNREG), udp]).results] == ["EPERM"] * 2
    original = env.settings
    opened = probes.ProbeSettings(**{**original.__dict__, "passthrough": ((env.net.ip4, P_UNREG),)})
    try:
        env.handle.update_targets(opened)
        bot = run_bot(env.bot_cg, [tcp(env.net.ip4, P_UNREG), udp])
        assert bot.results == [
            {"sockname": bot.results[0]["sockname"], "peer": [env.net.ip4, P_UNREG],
             "reply": f"target:{P_UNREG}:hello\n"},  # straight to the target, not via the listener
            {"sent": True},
        ]
    finally:
        env.handle.update_targets(original)
    assert run_bot(env.bot_cg, [tcp(env.net.ip4, P_UNREG)]).results[0]["errno"] == "EPERM"
