#!/usr/bin/env python
"""Benchmark sampling speed and memory; the same as ``var bench`` (see var/bench.py for the options).

    python scripts/bench_sampling.py --samplers var code --batch-sizes 1 16 64 256    # GPU, official sizes
    python scripts/bench_sampling.py --device cpu --tiny                              # CPU smoke run
"""

import sys

from var.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
