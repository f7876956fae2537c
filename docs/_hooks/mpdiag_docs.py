"""MkDocs hooks: what the docs show about mpdiag is generated from mpdiag at build time, never typed in.

- ``<!-- mpdiag:formats -->`` becomes the table of formats, from ``mpdiag.core.formats`` (the installed torch).
- ``<!-- mpdiag:cli -->`` becomes the help of every ``mpdiag`` command, from the argparse parser.
- ``img/report/*.png`` and ``img/report/report.html`` are a real report of the demo's unstable run,
  recorded and rendered while the site builds.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

from mkdocs.structure.files import File, Files

_REPORT_DIR = "img/report"


def formats_table() -> str:
    from mpdiag.core import formats

    rows = [
        "| format | torch dtype | exponent bits | mantissa bits | max | min normal | min subnormal | eps | "
        "range in bits | overflow becomes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in formats.all_formats():
        span = math.log2(f.max / f.min_subnormal)
        rows.append(
            f"| {f.name} | {str(f.dtype).replace('torch.', '') if f.dtype else '-'} | {f.exponent_bits} | "
            f"{f.mantissa_bits} | {f.max:.6g} | {formats.power_of_two(f.min_normal)} | "
            f"{formats.power_of_two(f.min_subnormal)} | {formats.power_of_two(f.eps)} | "
            f"{span:.1f} | {f.overflow.value} |"
        )
    return "\n".join(rows)


def cli_reference() -> str:
    from mpdiag.cli import build_parser

    parser = build_parser()
    parts = ["```text\n" + parser.format_help().rstrip() + "\n```"]
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")  # noqa: SLF001
    for name, sub in commands.choices.items():
        parts.append(f"## mpdiag {name}\n\n```text\n{sub.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def _example_report() -> Path:
    """Record the demo's unstable run (activations past fp16's max, gradients below its subnormals)."""
    import mpdiag
    from mpdiag.demo import run_demo

    out = Path(tempfile.mkdtemp(prefix="mpdiag-docs-"))
    with contextlib.redirect_stdout(io.StringIO()):
        path = run_demo(out, steps=12, unstable=True)
    mpdiag.report(mpdiag.load(path), out, title="mpdiag report of the demo's unstable run")
    return out


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - mkdocs' config object
    out = _example_report()
    for path in sorted(out.glob("*.png")) + [out / "report.html"]:
        files.append(File.generated(config, f"{_REPORT_DIR}/{path.name}", content=path.read_bytes()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    return markdown.replace("<!-- mpdiag:formats -->", formats_table()).replace("<!-- mpdiag:cli -->", cli_reference())
