"""``var calibrate-kv``: measure every layer's attention selectivity per scale and write a ScaleKV budget.

    var calibrate-kv --ckpt RUN --kv-budget 0.1 --out budget.json
    var sample --ckpt RUN --kv-budget budget.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from var.argtypes import integer, number
from var.sample.arguments import (
    add_model_arguments,
    add_settings_arguments,
    add_text_arguments,
    apply_release,
    encode_prompts,
    load_models,
    read_prompts,
    settings_from_args,
    use_text_arguments,
)
from var.sample.scalekv.budget import WINDOW_SIDE, KVBudget, scale_key
from var.sample.scalekv.cache import budget_shape
from var.sample.scalekv.calibrate import measure_selectivity
from var.text import T5TextEncoder
from var.utils import autocast, resolve_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate-kv", help="measure attention selectivity per layer and scale, write a ScaleKV budget JSON"
    )
    add_model_arguments(parser)
    add_settings_arguments(parser)
    group = parser.add_argument_group("calibration")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--labels", type=integer(-1), nargs="+", help="calibration class labels")
    which.add_argument("--num-labels", type=integer(1), default=10, help="this many random classes (default 10)")
    add_text_arguments(parser, which)
    group.add_argument("--kv-budget", type=number(0, 1, exclusive_minimum=True), default=0.1,
                       help="fraction of the cache kept (default 0.1)")
    group.add_argument("--drafter-fraction", type=number(0, 1), default=0.1,
                       help="share of the compressed (layer, scale) pairs classified as drafters (default 0.1)")
    group.add_argument("--kv-window", type=integer(1), default=WINDOW_SIDE,
                       help="observation window grid side (default 4: 16 tokens)")
    group.add_argument("--history-top-k", type=integer(1),
                       help="K' of the selectivity index (default: the tokens per layer of the budget)")
    group.add_argument("--out", required=True, help="budget JSON to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    apply_release(args)
    settings = settings_from_args(args)
    prompts = read_prompts(args)
    encoder = T5TextEncoder(args.text_encoder, device=device) if prompts else None  # missing T5: fail first
    vqvae, model = load_models(args, device)
    use_text_arguments(args, model, prompts)
    cfg = budget_shape(model)
    if prompts is not None:
        labels = encode_prompts(encoder, model, prompts)
        del encoder
    elif args.labels is not None:
        labels = torch.tensor(args.labels)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        labels = torch.randperm(model.num_classes, generator=generator)[: args.num_labels]
    per_layer = KVBudget.uniform(cfg, args.kv_budget, args.kv_window).tokens_per_layer
    history_top_k = args.history_top_k or per_layer
    with autocast(device, args.dtype):
        selectivity = measure_selectivity(model, vqvae, labels, history_top_k, settings,
                                          args.batch_size, args.seed)
    budget = KVBudget.from_selectivity(cfg, selectivity, args.kv_budget, args.drafter_fraction, args.kv_window)
    out = Path(args.out)
    budget.save(out)
    print(f"calibrated on {len(labels)} {'prompts' if prompts else 'labels'}; {per_layer} history tokens per layer "
          "on average "
          f"({args.kv_budget:g} of {cfg.seq_len - cfg.tokens_per_scale[-1]})")
    for k, pn in enumerate(cfg.patch_nums):
        kept = budget.history[k]
        if k > 0 and cfg.scale_bounds[k - 1][1] > per_layer:
            print(f"  scale {scale_key(pn):>5} drafters {budget.drafters[k] or '-'}; tokens kept per layer "
                  f"{min(kept)}..{max(kept)} of {cfg.scale_bounds[k - 1][1]}")
    print(f"wrote {out}")
