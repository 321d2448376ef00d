"""Test harness for the probes room (own fixtures, kept out of conftest.py).

- ``TargetNet``: a network namespace with a veth pair, so the target lives at
  a non-loopback address (IPv4 and IPv6); inside it a small TCP server answers
  ``target:<port>:<line>`` on two ports (one registered, one not).
- ``Relay``: the test's stand-in for the inspector's accept side: it accepts
  redirected connections, calls ``probes.lookup`` and relays one line to the
  original destination over its own (never redirected) upstream connection,
  answering ``via-<name>|<upstream reply>``.
- ``UnixEcho``: a Unix stream/datagram server anyone may reach (``unix:<name>:<line>``).
- ``run_bot``: starts a bot process in a cgroup (as ``nobody``) that tries a
  list of connections and reports, per attempt, the reply or the errno.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

import probes
from probes import cgroups

BOT_PYTHON = "/usr/bin/python3"  # the bot's executable, as attribution should report it
BOT_USER = "nobody"

_TARGET_SERVER = r"""
import socket, sys, threading
def serve(ls, port):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c, port), daemon=True).start()
def handle(c, port):
    with c:
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        c.sendall(b"target:%d:" % port + data)
for port in map(int, sys.argv[1:]):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::", port))
    ls.listen(256)
    threading.Thread(target=serve, args=(ls, port), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

BOT_SCRIPT = r"""
import ctypes, errno, json, mmap, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def uring_connect(sock, sockaddr):
    # connect() as IORING_OP_CONNECT through a raw io_uring (setup 425, enter 426); 0 or -errno.
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(425, 4, params)
    if ring < 0:
        return -ctypes.get_errno()
    try:
        sq_entries, cq_entries = struct.unpack_from("II", params, 0)
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params, 40)
        cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("6I", params, 80)
        sq = mmap.mmap(ring, sq_array + sq_entries * 4, offset=0)
        cq = mmap.mmap(ring, cqes + cq_entries * 16, offset=0x8000000)
        sqes = mmap.mmap(ring, sq_entries * 64, offset=0x10000000)
        addr = ctypes.create_string_buffer(sockaddr, len(sockaddr))
        sqes[0:64] = struct.pack("<BBHiQQIIQ", 16, 0, 0, sock.fileno(), len(sockaddr), ctypes.addressof(addr),
                                 0, 0, 7).ljust(64, b"\0")
        tail = struct.unpack_from("I", sq, sq_tail)[0]
        struct.pack_into("I", sq, sq_array + 4 * (tail & struct.unpack_from("I", sq, sq_mask)[0]), 0)
        struct.pack_into("I", sq, sq_tail, tail + 1)
        if libc.syscall(426, ring, 1, 1, 1, None, 0) < 0:
            return -ctypes.get_errno()
        head = struct.unpack_from("I", cq, cq_head)[0]
        return struct.unpack_from("<Qi", cq, cqes + 16 * (head & struct.unpack_from("I", cq, cq_mask)[0]))[1]
    finally:
        os.close(ring)

def sockaddr(fam, a):
    if fam == socket.AF_UNIX:
        return struct.pack("<H", 1) + a["ip"] + (b"" if a["ip"][:1] == b"\0" else b"\0")
    if fam == socket.AF_INET6:
        return struct.pack("<H", 10) + struct.pack(">HI", a["port"], 0) + socket.inet_pton(fam, a["ip"]) + b"\0" * 4
    return struct.pack("<H", 2) + struct.pack(">H", a["port"]) + socket.inet_aton(a["ip"]) + b"\0" * 8

def connect(s, fam, a):
    if not a.get("uring"):
        return s.connect(a["ip"] if fam == socket.AF_UNIX else (a["ip"], a["port"]))
    rc = uring_connect(s, sockaddr(fam, a))
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))

attempts = json.loads(sys.argv[1])
out = []
for a in attempts:
    fam = {"6": socket.AF_INET6, "unix": socket.AF_UNIX}.get(a["family"], socket.AF_INET)
    proto = a.get("proto", "tcp")
    kind = socket.SOCK_DGRAM if proto in ("udp", "udplite", "dgram", "icmp") else socket.SOCK_STREAM
    kind = socket.SOCK_RAW if proto == "raw" else kind
    if fam == socket.AF_UNIX:  # "@name": an abstract address
        a["ip"] = ("\0" + a["path"][1:] if a["path"].startswith("@") else a["path"]).encode()
    res = {}
    try:
        s = socket.socket(fam, kind, {"udplite": 136, "mptcp": 262, "raw": 1, "icmp": 1}.get(proto, 0))
    except OSError as e:
        out.append({"errno": errno.errorcode.get(e.errno, str(e.errno)), "at": "socket"})
        continue
    s.settimeout(5)
    try:
        if proto == "bind":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT leftovers
            s.bind((a["ip"], a["port"]))
            s.listen(1)
            res["bound"] = list(s.getsockname()[:2])
        elif proto == "tfo":
            s.settimeout(None)  # a non-blocking TFO sendto only says EINPROGRESS
            s.sendto(a.get("msg", "hello").encode() + b"\n", socket.MSG_FASTOPEN, (a["ip"], a["port"]))
            res["peer"] = list(s.getpeername()[:2])
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            res["reply"] = data.decode()
        elif kind == socket.SOCK_DGRAM:
            s.sendto(b"x", a["ip"] if fam == socket.AF_UNIX else (a["ip"], a["port"]))
            res["sent"] = True
        elif fam == socket.AF_UNIX:
            connect(s, fam, a)
            s.sendall(a.get("msg", "hello").encode() + b"\n")
            res["reply"] = s.recv(4096).decode()
        else:
            if a.get("reuseaddr"):  # lets a test rebind this address whatever state the socket ends in
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if a.get("src_port"):  # a source port no other connection shares (see quiet_port)
                s.bind(("127.0.0.1", a["src_port"]))
            connect(s, fam, a)
            res["sockname"] = list(s.getsockname()[:2])
            res["peer"] = list(s.getpeername()[:2])
            s.sendall(a.get("msg", "hello").encode() + b"\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            res["reply"] = data.decode()
    except OSError as e:
        res["errno"] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    finally:
        s.close()
    out.append(res)
print(json.dumps({"pid": os.getpid(), "results": out}), flush=True)
"""


# One tag per test process: e2e modules name their bots' cgroup, pin dir and nft table with it,
# so two suites (two checkouts) on one machine never share kernel objects.
RUN_TAG = secrets.token_hex(3)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_port() -> int:
    """A free 127.0.0.1 port below the ephemeral range, so no connect() elsewhere is given it.

    An ephemeral port is shared by every connection to a different destination, and any one of
    them without SO_REUSEADDR stops a later bind() of that port (EADDRINUSE for as long as it lives).
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class TargetNet:
    """netns + veth; the target server answers on ``ports`` at ``ip4`` / ``ip6``."""

    ports: tuple[int, ...] = (5432, 6432, 7432)
    name: str = field(default_factory=lambda: unique("bwp-"))
    ip4: str = ""
    host_ip4: str = ""
    ip6: str = ""
    _server: subprocess.Popen | None = None
    _host_if: str = ""

    def start(self) -> "TargetNet":
        tag = self.name[-6:]
        self._host_if, peer_if = f"bwh{tag}", f"bwn{tag}"
        octet = int(tag[:2], 16) % 200 + 20  # a /30 inside 10.213.0.0/16, unique enough per run
        third = int(tag[2:4], 16)
        self.host_ip4, self.ip4 = f"10.213.{third}.{octet * 4 % 256 + 1}", f"10.213.{third}.{octet * 4 % 256 + 2}"
        # Normal form (a tag like "0c90" has a leading zero that getpeername() and the audit drop).
        self.ip6 = str(ipaddress.ip_address(f"fd00:b0:{tag[:4]}::2"))
        host_ip6 = str(ipaddress.ip_address(f"fd00:b0:{tag[:4]}::1"))
        netns.create(self.name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self._host_if, kind="veth", peer={"ifname": peer_if, "net_ns_fd": self.name})
                idx = ipr.link_lookup(ifname=self._host_if)[0]
                ipr.addr("add", index=idx, address=self.host_ip4, prefixlen=30)
                ipr.addr("add", index=idx, address=host_ip6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                ipr.link("set", index=idx, state="up")
            with NetNS(self.name) as ns:
                idx = ns.link_lookup(ifname=peer_if)[0]
                ns.addr("add", index=idx, address=self.ip4, prefixlen=30)
                ns.addr("add", index=idx, address=self.ip6, prefixlen=64, flags=0x02)
                ns.link("set", index=idx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, "-c", _TARGET_SERVER, *map(str, self.ports)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            if self._server.stdout.readline().strip() != "ready":
                raise RuntimeError("target server in the namespace did not start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            self._server = None
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self._host_if) if self._host_if else []
            if links:
                ipr.link("del", index=links[0])
        try:
            netns.remove(self.name)
        except OSError:
            pass


class Relay:
    """The inspector's accept side, for tests: lookup() then relay one line upstream."""

    def __init__(self, port: int, *, name: str = "listener", pin_dir: str, nft_table: str = "botwarden",
                 host: str = "127.0.0.1"):
        self.port = port
        self.name = name
        self.pin_dir = pin_dir
        self.nft_table = nft_table
        self.seen: dict[tuple[str, int], probes.Attribution | None] = {}
        self.held: dict[tuple[str, int], socket.socket] = {}
        self.hold = False  # keep accepted connections open, unanswered (for later lookups)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(512)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer) -> None:
        if self.hold:
            self.seen[tuple(peer[:2])] = probes.lookup(conn, pin_dir=self.pin_dir, nft_table=self.nft_table)
            self.held[tuple(peer[:2])] = conn
            return
        with conn:
            attr = probes.lookup(conn, pin_dir=self.pin_dir, nft_table=self.nft_table)
            self.seen[tuple(peer[:2])] = attr
            if attr is None:
                conn.sendall(b"no-attribution\n")
                return
            conn.settimeout(5)
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                line += chunk
            try:
                with socket.create_connection(attr.original_dst, timeout=5) as up:
                    up.sendall(line)
                    reply = b""
                    while True:
                        chunk = up.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
            except OSError as e:
                reply = f"upstream-error:{e.errno}".encode()
            conn.sendall(f"via-{self.name}|".encode() + reply)

    def stop(self) -> None:
        for conn in self.held.values():
            conn.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


class UnixEcho:
    """A Unix stream or datagram server anyone may reach (answers ``unix:<name>:<line>``)."""

    def __init__(self, address: str, name: str, kind: int = socket.SOCK_STREAM):
        self.name = name
        self.path = None if address.startswith("@") else Path(address)
        self.received: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, kind)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        if not address.startswith("@"):
            os.chmod(address, 0o777)
        if kind == socket.SOCK_STREAM:
            self._sock.listen(16)
        self._kind = kind
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                if self._kind == socket.SOCK_DGRAM:
                    self.received.append(self._sock.recv(4096))
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"unix:" + self.name.encode() + b":" + conn.recv(4096))

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class BotRun:
    pid: int
    results: list[dict]


def run_bot(cgroup: str | Path | None, attempts: list[dict], *, user: str | None = BOT_USER,
            wrap: tuple[str, ...] = ()) -> BotRun:
    """Run the bot script in ``cgroup`` (None: outside any bot cgroup) and collect its report.
    ``wrap`` prefixes the command (e.g. ``("unshare", "-U")``)."""
    argv = [*wrap, BOT_PYTHON, "-c", BOT_SCRIPT, json.dumps(attempts)]
    if cgroup is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    else:
        proc = cgroups.spawn(cgroup, argv, user=user, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    report = json.loads(out)
    return BotRun(report["pid"], report["results"])


def tcp(ip: str, port: int, family: str | None = None, msg: str = "hello") -> dict:
    return {"family": family or ("6" if ":" in ip else "4"), "ip": ip, "port": port, "msg": msg}


def unix(path: str, proto: str = "stream", msg: str = "hello") -> dict:
    """An attempt on a Unix socket address (a path, or "@name" for an abstract one)."""
    return {"family": "unix", "path": path, "proto": proto, "msg": msg}


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def bpftool_json(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def exe_identity(path: str) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_ino, st.st_dev
