"""The ``mpdiag`` command line. Only this module prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError

__all__ = ["main", "build_parser"]


def _format_table() -> str:
    header = ("format", "dtype", "e", "m", "max", "min normal", "min subn.", "eps", "overflow at", "becomes")
    rows = [header]
    for f in _formats.all_formats():
        rows.append(
            (
                f.name,
                str(f.dtype).replace("torch.", "") if f.dtype else "-",
                str(f.exponent_bits),
                str(f.mantissa_bits),
                f"{f.max:.6g}",
                _formats.power_of_two(f.min_normal),
                _formats.power_of_two(f.min_subnormal),
                _formats.power_of_two(f.eps),
                f"{f.overflow_threshold:.6g}",
                f.overflow.value,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cmd_formats(args: argparse.Namespace) -> int:
    print(_format_table())
    print(
        "\ne/m: exponent/mantissa bits. Constants from torch.finfo. 'overflow at': the smallest magnitude that\n"
        "round-to-nearest takes past max; 'becomes': what the installed torch casts it to."
    )
    return 0


def _progress(step: int, total: int, loss: float) -> None:
    width = 30
    done = width * step // total
    end = "\n" if step == total else ""
    print(
        f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {loss:.3f}",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from mpdiag.analysis import analyse
    from mpdiag.demo import run_demo, unstable_sensitivity
    from mpdiag.io.runfile import load
    from mpdiag.render import report
    from mpdiag.render.terminal import summary

    out = Path(args.out)
    path = run_demo(
        out, steps=args.steps, dtype=args.dtype, device=args.device, unstable=args.unstable, progress=_progress
    )
    run = load(path)
    analysis = analyse(run)  # one analysis for the summary and the report
    print(summary(run, analysis=analysis))
    sens = unstable_sensitivity(args.device) if args.unstable else None
    if sens is not None:
        print(f"\n{sens}")
    title = "mpdiag demo: the built-in transformer"
    written = report(run, out, title=title, analysis=analysis, sensitivity=sens)
    print(f"\nrun file: {path}\nreport:   {written.html} (figures beside it, {written.seconds:.1f} s)")
    return 0


class _Bars:
    """A progress bar per precision on stderr. On a terminal they are redrawn in place; elsewhere (a log,
    a pipe) each is written once, when its precision has trained every step."""

    _WIDTH = 24

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.state: dict[str, tuple[int, int, float]] = {}
        self.drawn = 0

    def __call__(self, precision: str, step: int, total: int, loss: float) -> None:
        self.state[precision] = (step, total, loss)
        if self.live:
            self._redraw()
        elif step == total:
            print(self._bar(precision), file=self.stream, flush=True)

    def _bar(self, precision: str) -> str:
        step, total, loss = self.state[precision]
        done = self._WIDTH * step // total
        return f"{precision:>12} [{'#' * done}{'.' * (self._WIDTH - done)}] step {step}/{total}  loss {loss:.3f}"

    def _redraw(self) -> None:
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        lines = "\n".join(f"{self._bar(p)}\x1b[K" for p in self.state)
        print(up + lines, file=self.stream, flush=True)
        self.drawn = len(self.state)


def _cmd_compare(args: argparse.Namespace) -> int:
    from mpdiag.demo import compare_demo
    from mpdiag.render import report

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    cmp = compare_demo(steps=args.steps, device=args.device, precisions=precisions, progress=_Bars())
    print(cmp)
    written = report(cmp, Path(args.out), title="mpdiag compare: the built-in transformer in each precision")
    print(f"\nreport: {written.html} (each precision's own report in a folder beside it, {written.seconds:.1f} s)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mpdiag.io.runfile import load
    from mpdiag.render import report

    run = load(args.run)
    out = Path(args.out) if args.out else Path(args.run).with_name(Path(args.run).stem + "-report")
    written = report(
        run,
        out,
        top=args.top,
        scale_format=args.scale_format,
        title=args.title or f"mpdiag report: {Path(args.run).name}",
    )
    for verdict in written.verdicts:
        print(f"{verdict.level.upper():5} {verdict.sentence}")
    print(f"\nreport: {written.html} ({len(written.figures)} figures beside it, {written.seconds:.1f} s)")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from mpdiag.io.runfile import load
    from mpdiag.render.terminal import summary

    print(summary(load(args.run), n=args.top))
    return 0


def _cmd_tensorboard(args: argparse.Namespace) -> int:
    from mpdiag.integrations.tensorboard import to_tensorboard
    from mpdiag.io.runfile import load

    run = load(args.run)
    try:
        log_dir = to_tensorboard(run, args.log_dir)
    except ImportError as err:  # names the extra to install
        raise MpdiagError(str(err)) from err
    print(
        f"wrote {len(run.steps)} recorded steps of {args.run} to {log_dir}\n"
        f"view them with: tensorboard --logdir {log_dir}"
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpdiag", description="Numerical-stability diagnostics for PyTorch mixed-precision training."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "formats",
        help="table of the numeric formats and their constants",
        description="Print every format mpdiag knows with its constants, as the installed torch has them.",
    )
    p.set_defaults(func=_cmd_formats)
    p = sub.add_parser(
        "demo",
        help="train the built-in transformer with diagnose attached; summary and HTML report",
        description="Train the built-in small transformer on synthetic data with mpdiag "
        "attached, write the run file and the HTML report into --out, and print the summary.",
    )
    p.add_argument("--steps", type=_positive, default=40, help="training steps (default 40)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--unstable",
        action="store_true",
        help="activations past fp16's max and gradients below its subnormals, to have something to see",
    )
    p.add_argument("--out", default="mpdiag-demo", help="output directory (default mpdiag-demo/)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "compare",
        help="train the built-in transformer in each precision side by side; summary and HTML report",
        description="Train copies of the demo's transformer from the same weights on the same batches in "
        "each precision (mpdiag.compare), print one line per precision (convergence against fp32's noise, "
        "speed, peak memory) and write the comparison's report into --out.",
    )
    p.add_argument("--steps", type=_positive, default=40, help="training steps per precision (default 40; at least 4)")
    p.add_argument(
        "--precisions",
        default="fp32,tf32,bf16,fp16",
        help="comma-separated, among fp32, tf32, bf16, fp16, bf16-pure (default fp32,tf32,bf16,fp16)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="mpdiag-compare", help="output directory (default mpdiag-compare/)")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser(
        "summary",
        help="the riskiest sites per format of a run file",
        description="Print, per tracked format, the riskiest sites of a run file: headroom to "
        "max in bits, underflow %, overflow and NaN/inf counts.",
    )
    p.add_argument("run", help="a run file written by diagnose(run_file=...) or mpdiag demo")
    p.add_argument("--top", type=_positive, default=6, help="sites per format (default 6)")
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser(
        "report",
        help="write the HTML report (and PNG figures) of a run file",
        description="Write report.html, self-contained, with every figure also as a PNG file "
        "beside it, into the output directory; print the verdict per format.",
    )
    p.add_argument("run", help="a run file written by diagnose(run_file=...) or mpdiag demo")
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="output directory, created if missing (default: beside the "
        "run file, named after it: run.mpdiag -> run-report/)",
    )
    p.add_argument(
        "--top", type=_positive, default=40, help="sites shown in the figures (default 40; the table lists all)"
    )
    p.add_argument("--scale-format", default=None, help="format to replay loss scaling for (default fp16 when tracked)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser(
        "tensorboard",
        help="write a run file's steps as TensorBoard logs",
        description="Write every recorded step of a run file into TensorBoard event files in LOG_DIR, "
        "with the tags the live mpdiag.sinks.TensorBoard writes (see mpdiag.integrations.tensorboard).",
    )
    p.add_argument("run", help="a run file written by diagnose(run_file=...) or mpdiag demo")
    p.add_argument("log_dir", metavar="LOG_DIR", help="the directory tensorboard --logdir reads (created if missing)")
    p.set_defaults(func=_cmd_tensorboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (MpdiagError, OSError) as err:
        if args.debug:
            raise
        print(f"mpdiag: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
