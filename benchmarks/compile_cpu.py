#!/usr/bin/env python
"""Which compiled setup covers every scale best: dynamic shapes (what var/compile.py does) or one static graph
per scale under a raised recompile limit.  Each variant runs in two fresh processes that share a new compile
cache: the first compiles from scratch, the second shows what the cache saves.  In every process the compiled
and the eager scale loop are timed interleaved (random weights, official sizes, decode left out: only the
transformer is compiled here), and the tokens of both must be equal.

    python benchmarks/compile_cpu.py --depth 16 --batch-size 1 --out benchmarks/compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from var.utils import atomic_write_text

VARIANTS = ("dynamic", "static")


def child(args: argparse.Namespace) -> dict:
    """One process: build, compile with ``args.variant``, time first call, compiled and eager calls."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from var.compile import compile_for_sampling
    from var.models.var import build_var
    from var.sample.logits import SamplingSettings
    from var.sample.scale import VARSampler
    from var.tokenizers.vqvae import VQVAE

    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_var(args.depth).eval().requires_grad_(False)
    sampler = VARSampler(model, VQVAE().eval().requires_grad_(False), SamplingSettings())
    labels = list(range(args.batch_size))
    eager = model.forward_hidden

    def sample():
        return sampler.sample(labels, seed=0, decode=False).indices

    reference = sample()
    if args.variant == "dynamic":
        compile_for_sampling(model)
    else:  # one graph per scale: the limit must exceed the scale count
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(reference))
        model.forward_hidden = torch.compile(model.forward_hidden, dynamic=False)
    compiled = model.forward_hidden
    begin = time.perf_counter()
    tokens = sample()
    first_call = time.perf_counter() - begin
    times = {"compiled": [], "eager": []}
    for index in range(args.runs):
        for name in ("compiled", "eager") if index % 2 == 0 else ("eager", "compiled"):
            model.forward_hidden = compiled if name == "compiled" else eager
            begin = time.process_time()
            sample()
            times[name].append(time.process_time() - begin)
    limit_hit = any("recompile limit" in key.lower() for key in counters["unimplemented"])
    return {
        "variant": args.variant, "depth": args.depth, "B": args.batch_size,
        "first_call_sec": round(first_call, 2), "process_sec": round(time.perf_counter() - started, 2),
        "compiled_cpu_sec": round(min(times["compiled"]), 3), "eager_cpu_sec": round(min(times["eager"]), 3),
        "speedup_cpu": round(min(times["eager"]) / min(times["compiled"]), 3),
        "graphs": counters["stats"]["unique_graphs"], "recompile_limit_hit": limit_hit,
        "tokens_equal_eager": all(torch.equal(a, b) for a, b in zip(reference, tokens, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="benchmarks/compile_cpu.json")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    rows = []
    load_before = os.getloadavg()
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "VAR_COMPILE_CACHE": cache, "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / "inductor")}
            for process in (1, 2):
                command = [sys.executable, __file__, "--variant", variant, "--depth", str(args.depth),
                           "--batch-size", str(args.batch_size), "--runs", str(args.runs)]
                output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                rows.append({"process": process, **json.loads(output.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), flush=True)
    report = {"settings": {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "dtype": "fp32", "decode": False, "time": "process CPU time, min of runs",
                           "command": " ".join(["python", *sys.argv])},
              "load_average": {"before": load_before, "after": os.getloadavg()}, "results": rows}
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
