"""Config errors name the file, the key and the line; valid configs build frozen models."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from appliance.config import load_config, parse_config
from appliance.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
[appliance]
state_dir = "/tmp/bw-state"

[[targets]]
name = "orders"
protocol = "postgres"
address = "10.0.0.5:5432"
authentication = "attestation"
[targets.credential]
source = "static"
username = "app"
password_file = "/etc/botwarden/orders.pw"
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "bw.toml")
    return str(exc.value)


def test_valid_config_builds_frozen_models():
    cfg = parse_config(BASE, "bw.toml")
    target = cfg.target("orders")
    assert target.host_port == ("10.0.0.5", 5432)
    assert target.credential.source == "static"
    assert cfg.appliance.control_socket_mode == 0o600
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.name = "other"  # type: ignore[misc]


def test_typo_in_a_value_names_file_line_key_and_choices():
    msg = error_of(BASE.replace('protocol = "postgres"', 'protocol = "postgress"'))
    assert msg.startswith("bw.toml:6: targets[0].protocol:")
    assert "'postgres', 'ssh', 'kubernetes'" in msg and "'postgress'" in msg


def test_unknown_key_names_line_and_suggests_the_right_one():
    msg = error_of(BASE.replace("address =", "adress ="))
    assert msg.startswith("bw.toml:7: targets[0].adress: unknown key")
    assert "did you mean 'address'" in msg


def test_wrong_type_names_the_expected_type():
    msg = error_of(BASE + '\n[audit]\nbatch_max = "lots"\n')
    assert msg.startswith("bw.toml:15: audit.batch_max: must be an integer")
    assert "'lots'" in msg


def test_missing_required_key_names_the_table_line():
    msg = error_of(BASE.replace('address = "10.0.0.5:5432"\n', ""))
    assert "targets[0].address: required key is missing" in msg
    assert msg.startswith("bw.toml:4:")


def test_nested_table_error_has_its_own_line():
    msg = error_of(BASE.replace('source = "static"', 'source = "vaultt"'))
    assert msg.startswith("bw.toml:10: targets[0].credential.source:")


def test_world_accessible_control_socket_is_refused():
    msg = error_of('[appliance]\ncontrol_socket_mode = "0666"\n')
    assert msg.startswith("bw.toml:2: appliance.control_socket_mode:")
    assert "other users" in msg


def test_daemon_priority_defaults_to_ahead_of_the_bots_and_is_range_checked():
    assert parse_config(BASE, "bw.toml").appliance.nice == -10
    assert parse_config('[appliance]\nnice = 0\n', "bw.toml").appliance.nice == 0
    msg = error_of('[appliance]\nnice = -30\n')
    assert msg.startswith("bw.toml:2: appliance.nice:") and "-20" in msg and "-30" in msg


def test_audit_store_threads_default_to_one_and_are_range_checked():
    assert parse_config(BASE, "bw.toml").audit.threads == 1
    assert parse_config('[audit]\nthreads = 4\n', "bw.toml").audit.threads == 4
    msg = error_of('[audit]\nthreads = 0\n')
    assert msg.startswith("bw.toml:2: audit.threads:") and "from 1 to 1024" in msg
    assert "audit.threads" in error_of('[audit]\nthreads = "many"\n')


def test_journal_sync_is_off_by_default_and_only_for_strict_mode():
    assert parse_config(BASE, "bw.toml").audit.journal_sync is False
    assert parse_config('[audit]\njournal_sync = true\n', "bw.toml").audit.journal_sync is True
    msg = error_of('[audit]\nmode = "batched"\njournal_sync = true\n')
    assert "audit.journal_sync applies to mode = \"strict\" only" in msg, msg


def test_pacing_settings_default_and_are_range_checked():
    audit = parse_config(BASE, "bw.toml").audit
    assert (audit.pace_mark, audit.pace_wait) == (0.4, 0.5)
    assert parse_config('[audit]\npace_mark = 0.25\npace_wait = 2\n', "bw.toml").audit.pace_wait == 2
    msg = error_of('[audit]\npace_mark = 0.8\n')
    assert msg.startswith("bw.toml:2: audit.pace_mark:") and "below 0.8" in msg
    assert "audit.pace_wait" in error_of('[audit]\npace_wait = 0\n')
    assert "at most 60" in error_of('[audit]\npace_wait = 600\n')


def test_catalog_recheck_defaults_to_two_seconds_and_reaches_the_front():
    from appliance.daemon import make_front

    def with_(line: str) -> str:
        return BASE.replace('authentication = "attestation"\n', f'authentication = "attestation"\n{line}\n')
    assert parse_config(BASE, "bw.toml").targets[0].catalog_recheck_s == 2.0
    config = parse_config(with_("catalog_recheck_s = 0.5\nallow_plaintext = true"), "bw.toml")
    assert make_front(config.targets[0], config, None, None).settings.catalog_recheck_s == 0.5
    assert parse_config(with_("catalog_recheck_s = 0"), "bw.toml").targets[0].catalog_recheck_s == 0
    msg = error_of(with_("catalog_recheck_s = -1"))
    assert "targets[0].catalog_recheck_s" in msg and "must be zero or more" in msg


def test_daemon_without_the_privilege_to_raise_its_priority_says_so_and_runs(monkeypatch, caplog):
    from appliance import daemon

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(daemon.os, "setpriority", refuse)
    with caplog.at_level("WARNING"):
        daemon.set_priority(-10)
    assert "could not set the daemon's CPU priority to nice -10 (Operation not permitted)" in caplog.text
    assert daemon.STARTING_NICE == os.getpriority(os.PRIO_PROCESS, 0)


def test_a_session_leading_daemon_whose_autogroup_refuses_its_nice_says_so(monkeypatch, caplog, tmp_path):
    """The autogroup's nice cannot be written (here: the path is a directory): a warning, and the
    daemon runs (its thread priority still counts within its session)."""
    from appliance import daemon

    (tmp_path / "enabled").write_text("1\n")
    (tmp_path / "autogroup").mkdir()
    monkeypatch.setattr(daemon, "AUTOGROUPS", tmp_path / "enabled")
    monkeypatch.setattr(daemon, "AUTOGROUP", tmp_path / "autogroup")
    monkeypatch.setattr(daemon.os, "getsid", lambda pid: os.getpid())
    with caplog.at_level("WARNING"):
        daemon.set_autogroup_nice(-10)
    assert "could not set the daemon's scheduler autogroup to nice -10" in caplog.text
    assert "counts within its session only" in caplog.text


def test_invalid_toml_says_so():
    msg = error_of("[appliance\n")
    assert msg.startswith("bw.toml: not valid TOML")


def test_cross_section_references_are_checked():
    text = BASE + '\n[[identities]]\nname = "bot"\ntargets = ["nope"]\n[identities.process]\nuid = 1000\n'
    msg = error_of(text)
    assert "identities[0].targets[0]: unknown target 'nope'" in msg
    assert msg.startswith("bw.toml:16:")


def test_vault_source_without_vault_section():
    msg = error_of(BASE.replace('source = "static"', 'source = "kv"\npath = "x"'))
    assert 'needs a [vault] section' in msg


def test_token_authentication_needs_oidc():
    msg = error_of(BASE.replace('authentication = "attestation"', 'authentication = "token"'))
    assert "needs an [oidc] section" in msg


def test_hmac_algorithms_are_refused_for_oidc():
    text = BASE + '\n[oidc]\nissuer = "https://idp"\naudience = ["bw"]\nalgorithms = ["RS256", "HS256"]\n'
    msg = error_of(text)
    assert "HS256" in msg and "not allowed" in msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.toml")


def test_shipped_example_is_valid():
    cfg = load_config(ROOT / "botwarden.example.toml")
    assert cfg.targets, "the example should show at least one target"
    assert cfg.identities and cfg.policy.rules


def test_probe_passthrough_must_be_ip_port():
    cfg = parse_config(BASE + '\n[probes]\npassthrough = ["127.0.0.53:53", "[fd00::53]:53"]\n', "bw.toml")
    assert cfg.probes.passthrough == ("127.0.0.53:53", "[fd00::53]:53")
    err = error_of(BASE + '\n[probes]\npassthrough = ["dns.internal:53"]\n')
    assert "probes.passthrough" in err and "dns.internal:53" in err and "IP:PORT" in err
    from appliance.bots import probe_settings

    settings = probe_settings(cfg, {"orders": ("127.0.0.1", 15432)})
    assert [(p.ip, p.port) for p in settings.passthrough] == [("127.0.0.53", 53), ("fd00::53", 53)]
