"""``ssmkit models``: the model presets with parameter counts, and the mixer names for block patterns."""

from __future__ import annotations

import argparse
from typing import Any

from .common import int_at_least


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("models", help="list model presets and mixers", description=(
        "List the --model presets with parameter counts, and the mixer names usable in block patterns."))
    p.add_argument("--vocab-size", type=int_at_least(1), default=256,
                   help="vocabulary for the parameter counts (256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import CausalLM, ModelConfig, compress_pattern, mixer_names
    from ..train.presets import ALIASES, PRESETS, preset_fields

    vocab = args.vocab_size
    rows = []
    for name, (desc, _) in PRESETS.items():  # build every preset first: an error prints no half table
        fields = preset_fields(name)
        model = CausalLM(ModelConfig(**fields, vocab_size=vocab))
        rows.append((name, f"{model.num_parameters():,}", f"d_model={fields['d_model']}",
                     compress_pattern(model.backbone.mixer_names), desc))
    print(f"Model presets (--model NAME; parameter counts for a CausalLM with vocab_size={vocab}):\n")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"  {'preset':<{widths[0]}}  {'params':>{widths[1]}}  {'width':<{widths[2]}}  "
          f"{'pattern':<{widths[3]}}  description")
    for name, count, width, pattern, desc in rows:
        print(f"  {name:<{widths[0]}}  {count:>{widths[1]}}  {width:<{widths[2]}}  "
              f"{pattern:<{widths[3]}}  {desc}")
    print(f"\n  aliases: {', '.join(f'{a} = {b}' for a, b in ALIASES.items())}")
    print(f"\nMixers (for a custom block pattern: --model 'mamba2*2,attn' or --set model.pattern=...):\n  "
          f"{', '.join(mixer_names())}")
    print("\nOverride any field: --set model.d_model=128 --set model.mlp=swiglu "
          "--set model.mixer_options.mamba.d_state=8")
    return 0
