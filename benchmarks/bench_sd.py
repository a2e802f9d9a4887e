"""The full benchmark, ``sdrt bench``, as a script: ``python -m benchmarks.bench_sd [sdrt bench options]``.

    python -m benchmarks.bench_sd --workload tiny-random --steps 20,50 --threads 2
    python -m benchmarks.bench_sd --report
"""

from __future__ import annotations

import sys

from sdrt.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="python -m benchmarks.bench_sd")
