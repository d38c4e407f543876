"""`python -m tools.docs_tables [--check]`: the docs' tables of measurements, made from `benchmarks/results/`.

A table copied into a page by hand drifts from the run it came from, and pages copied from each
other drift apart. So a page holds a marker naming a results file (and optionally its sections,
and the CPU where an early file did not record it), and this command writes the table under it:

    <!-- results {"file": "benchmarks/results/X.json", "sections": ["model alone"]} -->
    | ... |
    <!-- /results -->

`--check` changes nothing and exits 1 if a page's tables differ from what the files say
(`tests/test_docs.py` runs it).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results (\{.*?\}) -->\n)(.*?)(<!-- /results -->)", re.S)


def number(value: float) -> str:
    """Three significant digits, without an exponent for the sizes measured here."""
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render(results: dict, sections: Optional[list[str]] = None, cpu: Optional[str] = None) -> str:
    rows = [row for row in results["rows"] if sections is None or row["section"] in sections]
    missing = set(sections or ()) - {row["section"] for row in rows}
    if missing:
        raise ValueError(f"no rows of section(s) {sorted(missing)} in the results of {results.get('time')}")
    machine = cpu or results.get("cpu")
    if not machine:
        raise ValueError(f"the results of {results.get('time')} do not name their CPU: give \"cpu\" in the marker")
    lines = [f"Measured {results['time']} on {machine}, {results.get('cpus', 2)} cores, torch "
             f"{results.get('torch', 'as pinned')}.", "",
             "| section | measurement | value | vs baseline |", "| --- | --- | --- | --- |"]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x {row['baseline_name']}" if row.get("ratio") is not None else ""
        lines.append(f"| {row['section']} | {row['name']} | {number(row['value'])} {row['unit']} | {ratio} |")
    return "\n".join(lines) + "\n"


def rewrite(text: str) -> str:
    def table(match: re.Match) -> str:
        marker = json.loads(match.group(2))
        results = json.loads((REPO / marker["file"]).read_text())
        return match.group(1) + render(results, marker.get("sections"), marker.get("cpu")) + match.group(4)

    return BLOCK.sub(table, text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docs_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        fresh = rewrite(text)
        if fresh != text:
            stale.append(page.relative_to(REPO))
            if not args.check:
                page.write_text(fresh)
    if stale:
        print(f"{'out of date' if args.check else 'rewrote'}: {', '.join(map(str, stale))}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
