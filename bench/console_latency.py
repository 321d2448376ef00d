"""How long from a bot's statement to its row in the operator console, through the real daemon.

Run as root from the repository root:

    .venv/bin/python bench/console_latency.py [--rounds 20]

It starts a real PostgreSQL 15 and OpenBao (appliance.sandbox), the daemon (`botwarden run`,
probes off: the bot connects to the target's listener with an OpenBao identity token), and
the console headless (Textual's ``run_test``, the same app as ``botwarden tui``), connected
to the daemon's control socket. Each round a psycopg connection that is already open sends
a DELETE that a rule holds for approval; the clock starts just before ``execute`` and stops
when the console's event loop sees the request's row in its approvals table (checked every
millisecond; the terminal is redrawn within the next frame). The request is then denied
through the control API and the next round starts. Prints the median, 90th percentile and
maximum in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RULE = """
[[rules]]
name = "bench-deletes-need-approval"
action = "approve"
[rules.sql]
kinds = ["DELETE"]
relations = ["console_bench"]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import psycopg

    from appliance.control import ControlClient
    from appliance.sandbox import OpenBaoServer, PostgresServer
    from tests.daemon_fixtures import DaemonProcess, fresh_setup, new_port, write_config
    from tui.app import BotwardenApp

    workdir = Path(tempfile.mkdtemp(prefix="bw-console-bench-"))
    pg = PostgresServer(ssl=True).start()
    bao = OpenBaoServer().start()
    daemon = None
    try:
        pg.psql("CREATE TABLE console_bench (id int PRIMARY KEY); GRANT ALL ON console_bench TO PUBLIC")
        setup = fresh_setup(bao, pg, workdir)
        port = new_port()
        socket_path = workdir / "run" / "control.sock"
        config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg, bao=setup, listen_port=port,
                              rules=RULE, socket_path=socket_path)
        daemon = DaemonProcess(config, socket_path).start()
        client = ControlClient(str(socket_path))
        conn = psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", dbname="postgres",
                               password=setup.mint_token(), sslmode="disable", autocommit=True)

        arrived: list[float] = []

        class TimedApp(BotwardenApp):
            def on_watch_event(self, message) -> None:  # when the stream's event reaches the UI loop
                if message.event.get("event") == "requested":
                    arrived.append(time.perf_counter())
                super().on_watch_event(message)

        async def measure() -> list[float]:
            app = TimedApp(str(socket_path), status_every_s=5.0)
            results: list[float] = []
            async with app.run_test(size=(120, 40)):
                while not app.watch_live:
                    await asyncio.sleep(0.01)
                table = app.query_one("#approvals-table")
                for i in range(args.rounds):
                    started: list[float] = []
                    done = threading.Event()

                    def bot(row: int = i) -> None:
                        started.append(time.perf_counter())
                        try:
                            conn.execute(f"DELETE FROM console_bench WHERE id = {row}")
                        except psycopg.Error:
                            pass  # denied below: the bot is told so
                        done.set()

                    threading.Thread(target=bot, daemon=True).start()
                    while table.row_count == 0:
                        await asyncio.sleep(0.001)
                    results.append((time.perf_counter() - started[0]) * 1000)
                    to_ui.append((arrived[-1] - started[0]) * 1000)
                    approval_id = app.book.items()[0]["approval_id"]
                    await asyncio.to_thread(client.post, f"/v1/approvals/{approval_id}/deny",
                                            {"reason": "benchmark"})
                    await asyncio.to_thread(done.wait, 30)
                    while table.row_count:
                        await asyncio.sleep(0.001)
            return results

        to_ui: list[float] = []
        results = asyncio.run(measure())
        conn.close()
    finally:
        if daemon is not None:
            daemon.stop()
        bao.stop()
        pg.stop()
    ordered = sorted(results)
    p90 = ordered[max(0, int(round(0.9 * len(ordered))) - 1)]
    print(f"statement → row in the console, {len(results)} rounds: median {statistics.median(results):.1f} ms, "
          f"p90 {p90:.1f} ms, max {max(results):.1f} ms")
    print(f"of which statement → the stream's event in the console's loop: median {statistics.median(to_ui):.1f} ms, "
          f"max {max(to_ui):.1f} ms")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    print("all:", " ".join(f"{r:.1f}" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
