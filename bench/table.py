"""A compare.py result (JSON) as a Markdown table, the one in the README.

Usage::

    python bench/table.py bench/results/compare-<date>.json

Columns per workload and composite: images/s of deeptaylor (cpu), Zennit and the NumPy reference,
the ratio to Zennit, deeptaylor's effective GFLOP/s and its share of the SGEMM peak measured in the
same run (NumPy matmul, 2048²), and both frameworks' peak RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def table(report: dict) -> str:
    peak = report.get("sgemm", {}).get("numpy_gflops")
    lines = [
        ("| workload | method | deeptaylor img/s | Zennit img/s | NumPy ref. img/s | × Zennit | "
         "eff. GFLOP/s | % of SGEMM peak | peak RSS MiB (ours / Zennit) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for wl, entry in report["workloads"].items():
        for comp, c in entry["composites"].items():
            r = c["results"]
            d, z, n = r.get("deeptaylor", {}), r.get("zennit", {}), r.get("numpy_reference", {})
            eff = d.get("effective_gflops")
            share = f"{100 * eff / peak:.0f} %" if eff and peak else "-"
            ratio = d.get("ratio_to_zennit")
            lines.append(
                f"| {wl} | {comp} | {_rate(d.get('images_per_s'))} | {_rate(z.get('images_per_s'))} | "
                f"{_rate(n.get('images_per_s'))} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                f"{'-' if eff is None else f'{eff:.0f}'} | {share} | "
                f"{d.get('peak_rss_mib', 0):,.0f} / {z.get('peak_rss_mib', 0):,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python bench/table.py RESULT.json", file=sys.stderr)
        return 2
    report = json.loads(Path(args[0]).read_text())
    g = report.get("sgemm", {})
    print(f"SGEMM peak in the same run (2048², {report.get('threads')} threads): NumPy "
          f"{g.get('numpy_gflops', float('nan')):.0f} GFLOP/s, deeptaylor {g.get('ours_gflops', float('nan')):.0f}"
          f" GFLOP/s ({g.get('ours_kernel')})\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
