"""The `botwarden` command.

Exit codes: 0 success; 1 the operation failed or found a problem (verify, a refused
decision, a `policy test` mismatch); 2 bad usage or an invalid config; 3 the daemon is not
running (or another one is, for `run`). `policy explain` exits with its decision: 0 allow,
1 block, 4 approve, 5 mask.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from appliance.config import DEFAULT_CONTROL_SOCKET, Config, load_config
from appliance.control import ControlClient, ControlError, DaemonNotRunning
from appliance.errors import BotwardenError, ConfigError

DEFAULT_CONFIG = os.environ.get("BOTWARDEN_CONFIG", "/etc/botwarden/botwarden.toml")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # the reader of our output went away (128 + SIGPIPE, as a shell reports it)


class CliError(BotwardenError):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def _duration(text: str) -> int:
    """'90s', '15m', '2h', '1d' or plain seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _config(args: argparse.Namespace, required: bool = True) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as e:
        if required or Path(args.config).exists():
            raise CliError(str(e), EXIT_USAGE) from None
        return None


def _client(args: argparse.Namespace) -> ControlClient:
    path = args.socket
    if not path:
        cfg = _config(args, required=False)
        path = cfg.appliance.control_socket if cfg else DEFAULT_CONTROL_SOCKET
    return ControlClient(path)


def _print_table(columns: list[str], rows: list[list[Any]], fmt: str = "table") -> None:
    from analytics import format_table

    print(format_table(columns, [tuple(r) for r in rows], fmt))


# -- subcommands -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon

    return run_daemon(args.config)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = _client(args).get("/v1/status", timeout=5)
    except DaemonNotRunning as e:
        print(e.message)
        return EXIT_NO_DAEMON
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    print(f"botwarden daemon running (pid {st['pid']}) since {st['started_at']}, config {st['config']}")
    for t in st["targets"]:
        print(f"  target {t['name']:<20} {t['protocol']:<10} {t['address']:<24} listening on {t['listen']}")
    print(f"  audit store {st['audit']['path']} ({'healthy' if st['audit']['healthy'] else 'NOT HEALTHY'})")
    if "sessions_active" in st:
        print(f"  sessions: {st['sessions_active']} active; approvals pending: {st.get('approvals_pending', 0)}")
    if "probes" in st:
        print(f"  probes: {st['probes']}")
    fleet = st.get("fleet")
    if fleet:
        backlog = "unknown" if fleet.get("backlog") is None else f"{fleet['backlog']} row(s)"
        print(f"  fleet: bastion {fleet['bastion']}, lake {fleet['lake']}, shipped up to seq "
              f"{fleet.get('shipped_seq')}, backlog {backlog}, lag {fleet.get('lag_s', 0):g}s"
              + (f"; last error: {fleet['last_error']}" if fleet.get("last_error") else ""))
    pending = st.get("revocations_pending") or []
    if pending:
        print(f"  credential revocations pending: {len(pending)} (Vault could not revoke them yet; retried)")
        for p in pending:
            print(f"    lease {p['lease_id']} session {p['session_id'] or '-'}: {p['attempts']} attempt(s) "
                  f"since {p['since']}, last error: {p['last_error']}")
    adm = st.get("admission")
    if adm:
        print(f"  unauthenticated connections: {adm['unauthenticated']} open; refused {adm['refused']}, "
              f"timed out {adm['timed_out']} since start")
    if st.get("bots_left_cgroup"):
        print(f"  WARNING: {st['bots_left_cgroup']} bot processes left the bots' cgroups since start "
              "(audit: SELECT * FROM probes WHERE event = 'left_cgroup')")
    fa = st.get("fleet_approvals")
    if fa:
        print(f"  fleet approvals: {'connected' if fa['available'] else 'UNAVAILABLE: ' + fa['message']}")
    if st.get("last_reload_error"):
        print(f"  last reload refused: {st['last_reload_error']}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"{args.config}: OK ({len(cfg.targets)} targets, {len(cfg.identities)} identities, "
          f"{len(cfg.policy.rules)} rules)")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    _client(args).post("/v1/reload")
    print("config reloaded")
    return EXIT_OK


# `sessions --all` with the daemon down: the audit file's latest sessions, in the daemon's shape.
OFFLINE_SESSIONS_SQL = ("SELECT * FROM (SELECT session_id, identity, target, subject, credential_user, lease_id, "
                        "client, pid, uid, exe, cgroup, started, ended, state FROM (SELECT session_id, identity, "
                        "target, token_subject AS subject, credential_user, lease_id, client_addr AS client, pid, "
                        "uid, exe, cgroup_path AS cgroup, started_at AS started, ended_at AS ended, outcome AS state, "
                        "start_seq FROM sessions) ORDER BY start_seq DESC LIMIT ?) ORDER BY started")


def cmd_sessions(args: argparse.Namespace) -> int:
    try:
        sessions = _client(args).get("/v1/sessions" + ("?all=1" if args.all else ""))["sessions"]
    except DaemonNotRunning:
        if not args.all:
            raise  # no daemon, no active session: exit 3 and say so
        import analytics

        cfg = _config(args, required=False)
        db_path = args.path or (cfg.audit.path if cfg else None)
        if not db_path:
            raise CliError("no daemon running and no audit store path (--path or a config)", EXIT_USAGE) from None
        print(f"botwarden: the daemon is not running; sessions read from {db_path} (read-only)", file=sys.stderr)
        cols, rows = analytics.query_readonly(db_path, OFFLINE_SESSIONS_SQL, [args.limit])
        sessions = [dict(zip(cols, row)) for row in rows]
    if args.json:
        print(json.dumps(sessions, indent=2, default=str))
        return EXIT_OK
    cols = ["session_id", "identity", "target", "pid", "exe", "started", "state"]
    _print_table(cols, [[s.get(c) for c in cols] for s in sessions])
    return EXIT_OK


def _rows_cell(item: dict) -> str:
    """The affected-rows guard's numbers for one held request: "~5000 > 1000" (estimate, limit)."""
    limit = item.get("row_limit")
    if limit is None:
        return ""
    est = item.get("row_estimate")
    return f"~{est} > {limit}" if est is not None else f"unknown > {limit}"


def cmd_approvals(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "list":
        doc = client.get("/v1/approvals")
        items = doc["approvals"]
        fleet_note = (doc.get("fleet") or {}).get("message")
        if fleet_note:   # a partition: say it where operators look (stderr keeps --json parseable)
            print(f"botwarden: {fleet_note}", file=sys.stderr)
        if args.json:
            print(json.dumps(items, indent=2))
            return EXIT_OK
        if not items:
            print("no pending approvals")
            return EXIT_OK
        cols = (["bastion"] if "fleet" in doc else []) + ["approval_id", "identity", "target", "rule", "request",
                                                          "rows", "expires"]
        _print_table(cols, [[_rows_cell(i) if c == "rows" else i.get(c) for c in cols] for i in items])
        return EXIT_OK
    if args.action == "approve":
        body: dict[str, Any] = {"reason": args.reason or ""}
        if args.for_:
            body["for_s"] = args.for_
        res = client.post(f"/v1/approvals/{args.id}/approve", body)
        extra = f" (window {res['window_s']}s for this identity, target and statement shape)" \
            if res.get("window_s") else ""
        where = f" (held on {res['bastion']})" if res.get("bastion") else ""
        if res["state"] == "pending":
            print(f"approval {args.id}: {res['approvals']} of {res['required']} approvals recorded")
        else:
            print(f"approved {args.id}{extra}{where}")
        return EXIT_OK
    if args.action == "deny":
        client.post(f"/v1/approvals/{args.id}/deny", {"reason": args.reason})
        print(f"denied {args.id}")
        return EXIT_OK
    if args.action == "watch":
        try:
            for event in client.stream("/v1/approvals/watch"):
                if event.get("event") in ("keepalive",):
                    continue
                print(json.dumps(event, default=str), flush=True)
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    raise CliError(f"unknown approvals action {args.action}", EXIT_USAGE)


def cmd_audit(args: argparse.Namespace) -> int:
    import analytics

    cfg = _config(args, required=False)
    db_path = args.path or (cfg.audit.path if cfg else None)
    if args.action == "sql":
        try:
            doc = _client(args).post("/v1/audit/sql", {"sql": args.sql})
            cols, rows = doc["columns"], doc["rows"]
        except DaemonNotRunning:
            if not db_path:
                raise CliError("no daemon running and no audit store path (--path or a config)", EXIT_USAGE)
            cols, rows = analytics.query_readonly(db_path, args.sql)
        _print_table(cols, rows, args.format)
        return EXIT_OK
    if args.action == "report":
        if args.name is None:
            for name in analytics.reports.list_reports():
                print(name)
            return EXIT_OK
        try:
            doc = _client(args).get(f"/v1/audit/reports/{args.name}")
            cols, rows = doc["columns"], doc["rows"]
        except DaemonNotRunning:
            if not db_path:
                raise CliError("no daemon running and no audit store path (--path or a config)", EXIT_USAGE)
            cols, rows = analytics.reports.run_report(db_path, args.name)
        _print_table(cols, rows, args.format)
        return EXIT_OK
    if args.action == "verify":
        fleet_heads = _fleet_anchors(args) if args.anchors_from_fleet else None
        anchors = _read_anchors(args.anchors or [], fleet_heads) if args.anchors or fleet_heads else None
        try:  # the running daemon holds the file: it verifies what it has committed
            body: dict[str, Any] = {"allow_gaps": args.allow_gaps}
            if anchors:
                body["anchors"] = {str(seq): h for seq, h in anchors.items()}
            doc = _client(args).post("/v1/audit/verify", body, timeout=600)
            print(doc["report"])
            return EXIT_OK if doc["passes"] else EXIT_FAIL
        except DaemonNotRunning:
            pass
        if not db_path:
            raise CliError("no audit store path (--path or a config)", EXIT_USAGE)
        report = analytics.verify(db_path, anchors)
        # A gap (events known or possibly missing) fails unless the operator accepts it.
        print(report.text(allow_gaps=args.allow_gaps))
        return EXIT_OK if report.passes(args.allow_gaps) else EXIT_FAIL
    if args.action == "export":
        from datetime import date

        try:
            since = date.fromisoformat(args.since)
        except ValueError:
            raise CliError(f"--since {args.since!r} is not a date (YYYY-MM-DD)", EXIT_USAGE) from None
        out_dir = Path(args.dir).resolve()
        try:
            doc = _client(args).post("/v1/audit/export", {"since": since.isoformat(), "dir": str(out_dir)},
                                     timeout=600)
            files = doc["files"]
        except DaemonNotRunning:
            if not db_path:
                raise CliError("no audit store path (--path or a config)", EXIT_USAGE)
            files = analytics.export_parquet(db_path, since, out_dir)
        print(f"wrote {len(files)} Parquet file(s) under {out_dir}")
        return EXIT_OK
    raise CliError(f"unknown audit action {args.action}", EXIT_USAGE)


def _read_anchors(paths: list[str], fleet_heads: dict[int, str] | None = None) -> dict[int, str]:
    """`audit verify --anchors` (and ``--anchors-from-fleet``: ``fleet_heads``): the chain
    positions in the files and the lake, at most the control API's MAX_ANCHORS of them: the last
    one always (a rewrite with recomputed hashes changes every hash after the first row it
    touched, so the last position kept catches any rewrite before it), the others evenly spaced
    (they say where a rewrite began)."""
    from analytics.verify import parse_anchors
    from appliance.api import MAX_ANCHORS

    sources: list[tuple[str, dict[int, str]]] = []
    for path in paths:
        try:
            found = parse_anchors(Path(path).read_text(errors="replace"), path)
        except OSError as e:
            raise CliError(f"--anchors {path}: {e.strerror or e}", EXIT_USAGE) from None
        except ValueError as e:
            raise CliError(str(e), EXIT_USAGE) from None
        if not found:
            raise CliError(f"--anchors {path}: no chain position in it (audit stream events with "
                           "metadata.sequence and chain_hash, or `head seq N hash H` lines)", EXIT_USAGE)
        sources.append((path, found))
    if fleet_heads:
        sources.append(("the fleet lake", fleet_heads))
    first: dict[int, tuple[str, str]] = {}   # seq -> (hash, the copy that gave it first)
    for source, found in sources:
        for seq, h in found.items():
            known, where = first.setdefault(seq, (h, source))
            if known != h:
                raise CliError(f"--anchors: seq {seq} has two hashes in the copies given ({known} in {where}, "
                               f"{h} in {source})", EXIT_USAGE)
    anchors = {seq: h for seq, (h, _) in first.items()}
    seqs = sorted(anchors)
    if len(seqs) > MAX_ANCHORS:
        step = len(seqs) / (MAX_ANCHORS - 1)
        seqs = sorted({seqs[int(i * step)] for i in range(MAX_ANCHORS - 1)} | {seqs[-1]})
    return {seq: anchors[seq] for seq in seqs}


def _fleet_anchors(args: argparse.Namespace) -> dict[int, str]:
    """`audit verify --anchors-from-fleet`: the chain hash at the end of each batch this bastion
    shipped to the fleet lake (a copy off the host, written as the rows were shipped)."""
    from analytics import fleet

    lake = _lake(args)
    _, rows = fleet.run_sql(lake, f"SELECT seq_hi, head_hash FROM {fleet.BATCHES} WHERE bastion = ? ORDER BY seq_hi",
                            [lake.bastion])
    if not rows:
        raise CliError(f"--anchors-from-fleet: the fleet lake holds no batch of bastion {lake.bastion!r} yet "
                       "(nothing shipped: see `botwarden status`)", EXIT_USAGE)
    return {int(seq): str(h) for seq, h in rows}


def _lake(args: argparse.Namespace):
    cfg = _config(args)
    if cfg.fleet is None:
        raise CliError(f"{args.config} has no [fleet] section: the lake's catalog and data path are "
                       "configured there (docs/fleet.md)", EXIT_USAGE)
    return cfg.fleet.lake()


def _local_heads(args: argparse.Namespace, lake: Any) -> dict[str, dict[int, str]] | None:
    """This bastion's own chain hashes at the ends of its last 1,000 shipped batches, through the
    daemon (None when it does not run: the lake is then checked against itself only)."""
    from analytics import fleet

    _, batches = fleet.run_sql(lake, f"SELECT seq_hi FROM {fleet.BATCHES} WHERE bastion = ? "
                                     "ORDER BY seq_hi DESC LIMIT 1000", [lake.bastion])
    if not batches:
        return None
    try:
        doc = _client(args).post("/v1/audit/sql", {
            "sql": "SELECT chain_seq, lower(hex(chain_hash)) FROM chain WHERE list_contains(?, chain_seq)",
            "params": [[int(r[0]) for r in batches]]})
    except DaemonNotRunning:
        return None
    return {lake.bastion: {int(seq): h for seq, h in doc["rows"]}}


def cmd_fleet(args: argparse.Namespace) -> int:
    from analytics import fleet

    lake = _lake(args)
    if args.action == "sql":
        cols, rows = fleet.run_sql(lake, args.sql)
        _print_table(cols, rows, args.format)
        return EXIT_OK
    if args.action == "report":
        import analytics

        if args.name is None:
            for name in analytics.reports.list_reports():
                print(name)
            return EXIT_OK
        cols, rows = fleet.run_report(lake, args.name)
        _print_table(cols, rows, args.format)
        return EXIT_OK
    if args.action == "verify":
        report = fleet.verify_lake(lake, _local_heads(args, lake))
        print(report.text())
        return EXIT_OK if report.ok else EXIT_FAIL
    if args.action == "compact":
        done = fleet.compact(lake, args.keep_days)
        print(f"lake compacted: requests in {done['requests_files_before']} -> {done['requests_files_after']} "
              f"file(s); {done['snapshots_expired']} snapshot(s) older than {args.keep_days} day(s) expired, "
              f"{done['files_deleted']} file(s) deleted")
        return EXIT_OK
    raise CliError(f"unknown fleet action {args.action}", EXIT_USAGE)


def cmd_replay(args: argparse.Namespace) -> int:
    from appliance.replay import replay_session

    cfg = _config(args, required=False)
    return replay_session(args, cfg)


def cmd_session_export(args: argparse.Namespace) -> int:
    from appliance.recordings.export import write_cast, write_jsonl, write_pcap
    from appliance.recordings.load import Reader, load_session

    if not (args.cast or args.pcap or args.jsonl):
        raise CliError("say what to write: --cast FILE, --pcap FILE and/or --jsonl FILE", EXIT_USAGE)
    cfg = _config(args, required=False)
    rec = load_session(Reader(cfg, getattr(args, "socket", None), args.path), args.session_id)
    if rec is None:
        raise CliError(f"no session {args.session_id!r} in the audit store", EXIT_FAIL)
    if args.pcap and rec.protocol != "postgresql":
        raise CliError(f"--pcap exports PostgreSQL sessions; this one is {rec.protocol}", EXIT_USAGE)
    for path, write, what in ((args.cast, write_cast, "asciicast v2 event(s)"), (args.pcap, write_pcap, "packet(s)"),
                              (args.jsonl, write_jsonl, "line(s)")):
        if path:
            print(f"{path}: {write(rec, path)} {what}")
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from appliance.policy import PolicyEngine, explain, lint
    from appliance.policy.explain import EXIT_STATUS

    cfg = _config(args)
    if args.action in ("check", "lint"):
        findings = lint(cfg.policy, cfg.targets, cfg.identities)
        for f in findings:
            print(f)
        errors = [f for f in findings if getattr(f, "severity", "error") == "error"]
        print(f"{len(cfg.policy.rules)} rules: {len(errors)} error(s), {len(findings) - len(errors)} warning(s)")
        return EXIT_FAIL if errors else EXIT_OK
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    if args.action == "test":
        return _policy_test(engine, Path(args.file))
    try:
        cfg.identity(args.identity)
    except KeyError:
        raise CliError(f"unknown identity {args.identity!r}", EXIT_USAGE) from None
    try:
        cfg.target(args.target)
    except KeyError:
        raise CliError(f"unknown target {args.target!r}", EXIT_USAGE) from None
    result = explain(engine, args.identity, args.target, args.statement)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result)
    return EXIT_STATUS[result.decision.action]


def _policy_test(engine: Any, path: Path) -> int:
    from appliance.policy.testing import CorpusError, parse_corpus, run_corpus

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None
    try:
        outcomes = run_corpus(engine, parse_corpus(text, path.name))
    except CorpusError as e:
        raise CliError(f"{path}: {e}", EXIT_USAGE) from None
    failed = [o for o in outcomes if not o.passed]
    for o in failed:
        print(o.describe())
    print(f"policy test {path.name}: {len(outcomes)} cases, {len(failed)} mismatch(es)")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_bot_run(args: argparse.Namespace) -> int:
    from appliance.bots import run_bot

    cfg = _config(args, required=False)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("usage: botwarden bot run --name NAME [--user USER | --allow-privileged] -- COMMAND [ARGS...]",
                       EXIT_USAGE)
    return run_bot(cfg, args.name, command, user=args.user, allow_privileged=args.allow_privileged)


def cmd_probes(args: argparse.Namespace) -> int:
    from appliance.bots import probes_command

    cfg = _config(args)
    return probes_command(cfg, args.action, json_out=args.json)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run_tui

    return run_tui(_client(args).path)


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(keep=args.keep, workdir=args.workdir)


def cmd_ssh(args: argparse.Namespace) -> int:
    """`botwarden ssh known-hosts`: the line bots add to known_hosts to trust the appliance's host
    certificates (made on first use; the daemon signs each SSH target's host key with it)."""
    from appliance.fronts.ssh import known_hosts_line, load_or_make_host_ca

    cfg = _config(args)
    state = Path(cfg.appliance.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(known_hosts_line(load_or_make_host_ca(str(state / "ssh_host_ca")), args.hosts))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(args)


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="botwarden", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--socket", help="control socket (default: from the config)")
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run the daemon")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="self-contained demo: PostgreSQL, OpenBao, daemon, a bot")
    s.add_argument("--keep", action="store_true", help="keep running until Ctrl-C after the demo bot ends")
    s.add_argument("--workdir", help="where the demo keeps its files (default: a temp dir)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("status", help="is the daemon running, and what is it doing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("config", help="configuration")
    ss = s.add_subparsers(dest="action", required=True)
    ss.add_parser("check", help="validate the config file").set_defaults(func=cmd_config_check)
    ss.add_parser("reload", help="ask the daemon to reload its config").set_defaults(func=cmd_reload)

    s = sub.add_parser("approvals", help="held requests")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("list")
    a.add_argument("--json", action="store_true")
    a = ss.add_parser("approve")
    a.add_argument("id")
    a.add_argument("--for", dest="for_", type=_duration, help="also approve the same statement shape for this long")
    a.add_argument("--reason", default="")
    a = ss.add_parser("deny")
    a.add_argument("id")
    a.add_argument("--reason", required=True)
    ss.add_parser("watch")
    s.set_defaults(func=cmd_approvals)

    s = sub.add_parser("sessions", help="sessions (active by default)")
    s.add_argument("--all", action="store_true",
                   help="also ended ones (daemon down: the latest --limit from the audit file, read-only)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--path", help="audit DuckDB file when the daemon is down (default: audit.path from the config)")
    s.add_argument("--limit", type=int, default=200, help="sessions read from the audit file (default 200)")
    s.set_defaults(func=cmd_sessions)

    s = sub.add_parser("audit", help="the audit store")
    s.add_argument("--path", help="audit DuckDB file (default: audit.path from the config)")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("sql", help="read-only SQL over the audit store")
    a.add_argument("sql")
    a.add_argument("--format", choices=["table", "csv", "json"], default="table")
    a = ss.add_parser("verify", help="check the integrity chain, the writer epochs and every session's events")
    a.add_argument("--allow-gaps", action="store_true",
                   help="exit 0 when the chain is intact even if events are missing (each gap is still printed)")
    a.add_argument("--anchors", action="append", metavar="FILE",
                   help="chain positions kept off the host, each compared with the store: the audit stream's "
                        "events (a SIEM's export, syslog lines or the stream's file) or `head seq N hash H` "
                        "lines of earlier reports; repeatable")
    a.add_argument("--anchors-from-fleet", action="store_true",
                   help="also compare the chain hash at the end of each batch this bastion shipped to the fleet "
                        "lake ([fleet] in the config)")
    a = ss.add_parser("report", help="canned reports (no name: list them)")
    a.add_argument("name", nargs="?")
    a.add_argument("--format", choices=["table", "csv", "json"], default="table")
    a = ss.add_parser("export", help="Parquet export, hive-partitioned by day")
    a.add_argument("--since", required=True, help="YYYY-MM-DD")
    a.add_argument("dir")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("fleet", help="the fleet lake: every bastion's audit as one (docs/fleet.md)")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("sql", help="read-only SQL over the lake (tables carry a bastion column)")
    a.add_argument("sql")
    a.add_argument("--format", choices=["table", "csv", "json"], default="table")
    a = ss.add_parser("report", help="a canned report across bastions (no name: list them)")
    a.add_argument("name", nargs="?")
    a.add_argument("--format", choices=["table", "csv", "json"], default="table")
    ss.add_parser("verify", help="check every bastion's shipped chain (and this bastion's against its store)")
    a = ss.add_parser("compact", help="merge the lake's small Parquet files; expire old snapshots (run from one host)")
    a.add_argument("--keep-days", type=int, default=7, help="snapshots (time travel) kept, in days (default 7)")
    s.set_defaults(func=cmd_fleet)

    s = sub.add_parser("replay", help="replay a recorded session (PostgreSQL as psql showed it, SSH as its "
                                      "terminal, Kubernetes as a request log)")
    s.add_argument("session_id")
    s.add_argument("--path", help="audit DuckDB file")
    s.add_argument("--speed", type=float, default=1.0, help="play N times faster than it happened (default 1)")
    s.add_argument("--no-wait", action="store_true", help="play at once, without the session's pauses")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("session", help="one recorded session")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("export", help="export a recorded session: asciicast v2, pcap (PostgreSQL), JSON lines")
    a.add_argument("session_id")
    a.add_argument("--cast", metavar="FILE", help="asciicast v2 (asciinema play FILE)")
    a.add_argument("--pcap", metavar="FILE", help="the PostgreSQL session as TCP packets (wireshark, tshark)")
    a.add_argument("--jsonl", metavar="FILE", help="one event per line")
    a.add_argument("--path", help="audit DuckDB file")
    a.set_defaults(func=cmd_session_export)

    s = sub.add_parser("policy", help="policy checks")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("explain", help="what would happen to this statement for this identity; exits 0 allow, "
                      "1 block, 4 approve, 5 mask (2 bad usage)")
    a.add_argument("--identity", required=True)
    a.add_argument("--target", required=True)
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("statement")
    ss.add_parser("check", aliases=["lint"], help="lint the policy")
    a = ss.add_parser("test", help="run a corpus of requests with expected decisions (TOML or TSV); "
                      "exits 1 on any mismatch")
    a.add_argument("file")
    s.set_defaults(func=cmd_policy)

    s = sub.add_parser("bot", help="bots")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("run", help="start a command inside a bot's watched cgroup")
    a.add_argument("--name", required=True)
    a.add_argument("--user", help="run the bot as this (unprivileged) user, switched to after joining its cgroup")
    a.add_argument("--allow-privileged", action="store_true",
                   help="run it even as root or with capabilities that can undo the probes (warns; its "
                        "sessions are marked privileged in the audit)")
    a.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bot_run)

    s = sub.add_parser("probes", help="eBPF probes")
    s.add_argument("action", choices=["status", "attach", "detach"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_probes)

    s = sub.add_parser("tui", help="the operator console")
    s.set_defaults(func=cmd_tui)

    s = sub.add_parser("ssh", help="SSH targets")
    ss = s.add_subparsers(dest="action", required=True)
    a = ss.add_parser("known-hosts", help="the @cert-authority line bots trust the appliance's host certificates with")
    a.add_argument("--hosts", default="*", help="host pattern the line covers (default: *)")
    a.set_defaults(func=cmd_ssh)

    s = sub.add_parser("doctor", help="check this host, the config and everything it points at")
    s.add_argument("--json", action="store_true", help="one JSON document for scripts")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    """The `botwarden` command. A reader that goes away early (`botwarden status | head -1`)
    ends the output quietly, as `cat` would: no traceback, exit status 141 (128 + SIGPIPE)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CliError as e:
        print(f"botwarden: {e}", file=sys.stderr)
        return e.code
    except DaemonNotRunning as e:
        print(f"botwarden: {e.message}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ControlError as e:
        print(f"botwarden: {e.message}", file=sys.stderr)
        return EXIT_FAIL
    except ConfigError as e:
        print(f"botwarden: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BotwardenError as e:
        print(f"botwarden: {e}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as e:
        # Errors of the rooms that may not import appliance (analytics, probes) carry their own
        # clear messages; anything else is a bug worth a traceback.
        from analytics import AuditError
        from probes import ProbeError

        if isinstance(e, (AuditError, ProbeError)):
            print(f"botwarden: {e}", file=sys.stderr)
            return EXIT_FAIL
        raise


if __name__ == "__main__":
    sys.exit(main())
