#!/usr/bin/env python
"""Benchmark sampling speed and memory; the same as ``var bench`` (see var/bench.py for the options).

    python scripts/bench_sampling.py --samplers var code --batch-sizes 1 16 64 256    # GPU, official sizes
    python scripts/bench_sampling.py --device cpu --tiny                              # CPU smoke run
"""

import argparse

from var.bench import add_arguments, finalize_defaults, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(finalize_defaults(parser.parse_args()))
