"""The ``mpdiag`` command line. Only this module prints."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from mpdiag import formats as _formats
from mpdiag.errors import MpdiagError


def _power_of_two(value: float) -> str:
    mantissa, exponent = math.frexp(value)
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{value:.6g}"


def _format_table() -> str:
    header = ("format", "dtype", "e", "m", "max", "min normal", "min subn.", "eps", "overflow at", "becomes")
    rows = [header]
    for f in _formats.all_formats():
        rows.append((f.name, str(f.dtype).replace("torch.", "") if f.dtype else "-", str(f.exponent_bits),
                     str(f.mantissa_bits), f"{f.max:.6g}", _power_of_two(f.min_normal),
                     _power_of_two(f.min_subnormal), _power_of_two(f.eps), f"{f.overflow_threshold:.6g}",
                     f.overflow.value))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cmd_formats(args: argparse.Namespace) -> int:
    print(_format_table())
    print("\ne/m: exponent/mantissa bits. Constants from torch.finfo. 'overflow at': the smallest magnitude that\n"
          "round-to-nearest takes past max; 'becomes': what the installed torch casts it to.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpdiag", description="Numerical-stability diagnostics for PyTorch "
                                     "mixed-precision training.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("formats", help="table of the numeric formats and their constants",
                       description="Print every format mpdiag knows with its constants, as the installed torch has them.")
    p.set_defaults(func=_cmd_formats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MpdiagError as err:
        if args.debug:
            raise
        print(f"mpdiag: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
