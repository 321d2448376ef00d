"""Smoke tests that need no root: the program text and flags, the BTF offsets, settings, records."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys

import pytest

import probes
from probes import records
from probes.btf import ATTRIBUTION_FIELDS, BTF, VMLINUX_BTF, kernel_offsets
from probes.loader import PROGRAMS, render_program
from probes.settings import SettingsError


def test_render_program_returns_source_and_defines_without_loading():
    settings = probes.ProbeSettings(
        targets=[("10.0.0.5", 5432, "127.0.0.1", 15432)], pin_dir="/sys/fs/bpf/bw-smoke", max_connections=4096
    )
    rendered = render_program(settings)
    for func, *_ in PROGRAMS:
        assert re.search(rf"^int {func}\(", rendered.source, re.M), func
    assert '#include "botwarden.h"' in rendered.source
    assert "struct bw_origin" in rendered.header
    flags = dict(f[2:].split("=", 1) for f in rendered.cflags if f.startswith("-D"))
    assert flags["BW_PIN_DIR"] == '"/sys/fs/bpf/bw-smoke"'
    assert flags["BW_MAX_CONNS"] == "4096"
    assert set(ATTRIBUTION_FIELDS) <= set(flags)
    assert flags["BW_SIZEOF_ORIGIN"] == str(ctypes.sizeof(records.Origin))
    # Every option the source uses arrives as a define (no string templating).
    used = set(re.findall(r"\bBW_(?:OFF|MAX|PIN|RINGBUF|EMIT)_[A-Z][A-Z_]*\b", rendered.source))
    assert used <= set(flags)
    assert str(rendered).startswith("// cflags: ")


def test_cli_renders_program_and_ruleset():
    out = subprocess.run([sys.executable, "-m", "probes", "render", "--target", "10.0.0.5:5432=127.0.0.1:15432"],
                         capture_output=True, text=True, check=True).stdout
    assert "int bw_connect4(" in out and "-DBW_MAX_TARGETS=1024" in out
    bad = subprocess.run([sys.executable, "-m", "probes", "render", "--target", "10.0.0.5:99999=127.0.0.1:1"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "target port" in bad.stderr


def test_btf_offsets_from_the_running_kernel():
    offsets = kernel_offsets()
    assert set(offsets) == set(ATTRIBUTION_FIELDS)
    assert all(0 <= v < 16384 for v in offsets.values())
    # Pointers are 8-byte aligned; exe_file sits inside an anonymous struct in mm_struct on new kernels.
    for name in ("BW_OFF_TASK_GROUP_LEADER", "BW_OFF_TASK_MM", "BW_OFF_MM_EXE_FILE", "BW_OFF_FILE_INODE"):
        assert offsets[name] % 8 == 0
    btf = BTF(VMLINUX_BTF.read_bytes())
    with pytest.raises(probes.ProbeError, match="no member"):
        btf.member_offset("task_struct", "no_such_field")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": [("10.0.0.5", 70000, "127.0.0.1", 1)]}, "target port"),
        ({"targets": [("db.example", 5432, "127.0.0.1", 1)]}, "target ip"),
        ({"targets": [("10.0.0.5", 5432, "127.0.0.1", 1), ("10.0.0.5", 5432, "127.0.0.1", 2)]}, "registered twice"),
        ({"pin_dir": "/tmp/pins"}, "pin_dir"),
        ({"mode": "iptables"}, "mode"),
        ({"ringbuf_pages": 3}, "ringbuf_pages"),
        ({"cgroup_parent": "../escape"}, "cgroup_parent"),
        ({"passthrough": [("10.0.0.5", 5432)], "targets": [("10.0.0.5", 5432, "127.0.0.1", 1)]}, "also a target"),
    ],
)
def test_settings_errors_name_the_setting(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        probes.ProbeSettings(**kwargs)


def test_settings_normalise_addresses_and_tuples():
    s = probes.ProbeSettings(targets=[("fd00:0::0005", 5432, "::1", 15432)], passthrough=[("127.0.0.53", 53)])
    assert s.targets == (probes.Target("fd00::5", 5432, "::1", 15432),)
    assert s.passthrough == (probes.Passthrough("127.0.0.53", 53),)


def test_addresses_share_one_normal_form():
    assert records.pack_ip("10.1.2.3") == records.pack_ip("::ffff:10.1.2.3")
    assert records.unpack_ip(records.pack_ip("::ffff:10.1.2.3")) == "10.1.2.3"
    assert records.unpack_ip(records.pack_ip("fd00::5")) == "fd00::5"
    k1 = records.tuple_key(("127.0.0.1", 15432), ("127.0.0.1", 40000))
    k2 = records.tuple_key(("::ffff:127.0.0.1", 15432), ("::ffff:127.0.0.1", 40000))
    assert bytes(k1) == bytes(k2)
    assert records.kernel_dev_to_user((8 << 20) | 1) == (8 << 8) | 1


def test_kernel_features_say_when_the_unix_hooks_are_missing(tmp_path):
    from probes.btf import UNIX_FIELDS, kernel_features

    here = kernel_features()  # this kernel (6.18) has them
    assert here.unix_missing is None and set(here.unix_offsets) == set(UNIX_FIELDS)
    assert here.escape_missing is None
    # The same BTF with the attach type renamed: what a kernel before 6.7 looks like to the check.
    older = tmp_path / "vmlinux"
    older.write_bytes(VMLINUX_BTF.read_bytes().replace(b"BPF_CGROUP_UNIX_CONNECT\0", b"BPF_CGROUP_UNIX_CONNECX\0"))
    missing = kernel_features(older)
    assert missing.unix_offsets is None
    assert missing.unix_missing == ("the kernel has no cgroup hooks for Unix sockets (BPF_CGROUP_UNIX_CONNECT, "
                                    "Linux 6.7+)")


def test_unix_allow_settings_are_checked():
    with pytest.raises(SettingsError, match="unix_allow: 'relative.sock' must be an absolute path"):
        probes.ProbeSettings(unix_allow=("relative.sock",))
    with pytest.raises(SettingsError, match="unix_sockets: 'maybe' is not one of filter, unfiltered"):
        probes.ProbeSettings(unix_sockets="maybe")
    with pytest.raises(SettingsError, match="is not a Unix socket address"):
        probes.ProbeSettings(unix_allow=("/" + "x" * 200,))
    key = records.unix_key("@name")
    assert key.len == 5 and bytes(key.path[:5]) == b"\0name" and records.unix_address(key) == "@name"
