"""`dspark report`: a governance snapshot as tables (usage, speculation and cost per class and tenant, quotas,
speculation switches) and, with --output_dir, the same tables in report.txt plus PNG plots: accepted tokens per
round, cost per million output tokens, latency percentiles and (after switches) the speculation timeline.

The snapshot is the JSON a Governor writes (Governor.write_snapshot) or serves at /snapshot.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import run_command

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined on first use (not at import), so importing this module never clashes with other commands'
    flags of the same names."""
    if "snapshot" in FLAGS:
        return
    flags.DEFINE_string("snapshot", None, "Governance snapshot JSON file (required).")
    if "output_dir" not in FLAGS:
        flags.DEFINE_string("output_dir", None, "Directory for report.txt and the PNG plots (default: print the "
                            "tables only).")


def body() -> None:
    from dspark_jax.governance.report import format_report, plot_report
    from dspark_jax.governance.snapshot import read_snapshot

    if not FLAGS.snapshot:
        raise ValueError("--snapshot is required")
    snapshot = read_snapshot(FLAGS.snapshot)
    text = format_report(snapshot)
    print(text, end="")
    if FLAGS.output_dir:
        out = Path(FLAGS.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".report.txt.tmp"
        tmp.write_text(text)
        tmp.replace(out / "report.txt")
        paths = [out / "report.txt"] + plot_report(snapshot, out)
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("report", __name__, __doc__, body, argv)
