"""``python -m probes``: show what would be loaded (no root needed), status, detach.

    python -m probes render --target 10.0.0.5:5432=127.0.0.1:15432
    python -m probes render-nft --target ...
    python -m probes status [--cgroup-parent P] [--pin-dir D]
    python -m probes detach [--cgroup-parent P] [--pin-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys

from probes import detach, nft, render_program, status
from probes.errors import ProbeError
from probes.settings import DEFAULT_PIN_DIR, ProbeSettings


def _target(text: str) -> tuple[str, int, str, int]:
    try:
        dst, listener = text.split("=", 1)
        ip, port = dst.rsplit(":", 1)
        lip, lport = listener.rsplit(":", 1)
        return ip.strip("[]"), int(port), lip.strip("[]"), int(lport)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected IP:PORT=LISTENER_IP:PORT, got {text!r}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes")
    parser.add_argument("command", choices=["render", "render-nft", "status", "detach"])
    parser.add_argument("--target", type=_target, action="append", default=[])
    parser.add_argument("--cgroup-parent", default="botwarden.bots")
    parser.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    parser.add_argument("--nft-table", default="botwarden")
    args = parser.parse_args(argv)
    try:
        settings = ProbeSettings(cgroup_parent=args.cgroup_parent, targets=tuple(args.target),
                                 pin_dir=args.pin_dir, nft_table=args.nft_table)
        if args.command == "render":
            print(render_program(settings))
        elif args.command == "render-nft":
            print(nft.render_ruleset(settings), end="")
        elif args.command == "status":
            print(json.dumps(status(settings).as_dict(), indent=2))
        else:
            result = detach(settings)
            print(result.event.detail)
    except ProbeError as e:
        print(f"probes: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
