"""Benchmark: wall time of every notebook of the course with its default parameters (papermill), and the total.

    python bench/course_time.py                      # all notebooks, into outputs/bench-course/
    python bench/course_time.py --only 02 -p device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tlkit.course import course_notebooks, parse_value, run_notebook, summary_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="*")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench-course"))
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args()
    params = {name: parse_value(value) for name, value in args.p}
    notebooks = course_notebooks(Path("notebooks"), args.only)
    print(f"{len(notebooks)} notebooks, parameters {params or 'defaults'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    runs = []
    for notebook in notebooks:
        runs.append(run_notebook(notebook, args.output_dir, params))
        print(f"  {runs[-1].notebook}: {runs[-1].seconds:.1f}s {runs[-1].headline()}", flush=True)
    print(summary_table(runs))
    failed = [r.notebook for r in runs if r.error]
    print(f"course total {sum(r.seconds for r in runs):.0f}s for {len(runs)} notebooks" + (f", FAILED: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
