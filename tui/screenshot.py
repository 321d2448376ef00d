"""A console screenshot (the SVG Textual exports: the palette's Screenshot command, the snapshot
tests) as a PNG, for documents that cannot show SVG.

    python -m tui.screenshot console.svg console.png [--width 1600]

Needs cairosvg (``pip install botwarden[docs]``). Textual's SVG asks for the Fira Code web font;
offline that falls back to a proportional font and the columns no longer line up, so the font
is swapped for a monospace one installed on the machine (DejaVu Sans Mono on Debian).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

MONOSPACE = "DejaVu Sans Mono"


def svg_to_png(svg: str, png: Path, width: int = 1600) -> None:
    import cairosvg

    svg = re.sub(r'font-family:\s*"?Fira Code"?(,\s*monospace)?', f'font-family: "{MONOSPACE}", monospace', svg)
    svg = re.sub(r"@font-face\s*\{[^}]*\}", "", svg)  # no web fonts: nothing is fetched
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(png), output_width=width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("svg", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args(argv)
    svg_to_png(args.svg.read_text(encoding="utf-8"), args.png, args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
