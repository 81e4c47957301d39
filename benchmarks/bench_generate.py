"""Generation speed: ssmkit's generate (parallel prefill, then O(1) recurrent steps) vs transformers' generate with
its cache, on the same weights, in one process (ratios).

    python benchmarks/bench_generate.py [--quick] [--threads N]

Model: a 130M-shaped Mamba (d_model 768, 24 layers, vocab 50280) with random weights, built as a transformers
MambaForCausalLM and converted with ssmkit.interop, so both sides hold identical weights. Cases:
- greedy decoding, 256-token prompt, 256 new tokens, batch 1 and 8: new tokens per second (prefill included, as
  a user of generate sees it) and whether both produced the same tokens;
- prefill of a 4096-token prompt, batch 1: the time to the first token's logits and the recurrent state
  (ssmkit: backbone forward with return_final_state + LM head on the last position; transformers: its forward with
  use_cache=True and logits_to_keep=1, i.e. what its generate runs first).
- the same decode cases with ``ssmkit.infer.quantize_weights`` (int8 weight-only linear layers, float32
  activations): opt-in, and not the same numerics, so its tokens may part from the float32 ones at near-ties;
  ``rows_identical`` counts rows whose tokens equal transformers' (``first_differing_step`` is the earliest step
  where any row differs).
``--quick`` uses 4 layers, a 64-token prompt, 32 new tokens and a 512-token prefill.
Writes benchmarks/results/bench_generate.json. Never touches the hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, current_rss_bytes, print_table, write_json  # noqa: E402

FULL = {"layers": 24, "prompt": 256, "new": 256, "batches": [1, 8], "prefill": 4096, "repeat": 2}
QUICK = {"layers": 4, "prompt": 64, "new": 32, "batches": [1, 8], "prefill": 512, "repeat": 2}


def build(layers: int):
    """(transformers model, ssmkit model) with the same random weights."""
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    from ssmkit.interop.models import from_transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=768, num_hidden_layers=layers, vocab_size=50280, state_size=16, expand=2,
                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf = MambaForCausalLM(cfg).eval()
    return hf, from_transformers(hf)


def prompt_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_case(hf, ours, batch: int, prompt: int, new: int, repeat: int, int8=None) -> list[dict]:
    from ssmkit.infer import generate

    ids = prompt_ids(batch, prompt, ours.config.vocab_size, seed=batch)
    out: dict = {}

    def run_ours():
        out["ours"] = generate(ours, ids, new, temperature=0)

    def run_hf():
        with torch.no_grad():
            seq = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                              pad_token_id=0)
        out["hf"] = seq[:, prompt:]

    # warm-up on a short run (kernel loading, first-call allocations), then time the full run
    generate(ours, ids[:, :8], 2, temperature=0)
    with torch.no_grad():
        hf.generate(ids[:, :8], max_new_tokens=2, do_sample=False, use_cache=True, pad_token_id=0)
    def run_int8():
        out["int8"] = generate(int8, ids, new, temperature=0)

    t_ours = best_time(run_ours, repeat=repeat, warmup=0)
    t_hf = best_time(run_hf, repeat=repeat, warmup=0)
    tokens = batch * new

    def row(case: str, t: float, got: torch.Tensor) -> dict:
        same = bool(torch.equal(got, out["hf"]))
        diff = (got != out["hf"]).any(0).nonzero()
        return {"case": case, "batch": batch, "prompt": prompt, "new_tokens": new, "ssmkit_s": t,
                "transformers_s": t_hf, "ssmkit_tok_per_s": tokens / t, "transformers_tok_per_s": tokens / t_hf,
                "speedup": t_hf / t, "same_tokens": same,
                "first_differing_step": int(diff[0]) if diff.numel() else None,
                "rows_identical": int((got == out["hf"]).all(1).sum())}

    rows = [row(f"decode b{batch}", t_ours, out["ours"])]
    if int8 is not None:
        generate(int8, ids[:, :8], 2, temperature=0)
        rows.append(row(f"decode b{batch} int8", best_time(run_int8, repeat=repeat, warmup=0), out["int8"]))
    return rows


def prefill_case(hf, ours, length: int, repeat: int) -> dict:
    ids = prompt_ids(1, length, ours.config.vocab_size, seed=7)
    res: dict = {}

    @torch.no_grad()
    def run_ours():
        hidden, state = ours.backbone(ids, return_final_state=True, input_name="input_ids")
        res["ours"] = ours.lm_head(hidden[:, -1])

    @torch.no_grad()
    def run_hf():
        res["hf"] = hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    t_ours = best_time(run_ours, repeat=repeat, warmup=1)
    t_hf = best_time(run_hf, repeat=repeat, warmup=0, budget_s=1.0)
    err = float((res["ours"] - res["hf"]).abs().max() / res["hf"].abs().max())
    return {"case": f"prefill {length}", "batch": 1, "prompt": length, "ssmkit_s": t_ours, "transformers_s": t_hf,
            "ssmkit_tok_per_s": length / t_ours, "transformers_tok_per_s": length / t_hf,
            "speedup": t_hf / t_ours, "last_logits_rel_err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers, short prompts (a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's own; on a busy shared machine 1 "
                             "avoids thread hand-off stalls that swamp small decode ops)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    p = QUICK if args.quick else FULL
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    hf, ours = build(p["layers"])
    print(f"model: {ours.summary()}  (threads: {torch.get_num_threads()})")
    from ssmkit.infer import quantize_weights

    int8 = quantize_weights(ours)
    rows = [r for b in p["batches"] for r in decode_case(hf, ours, b, p["prompt"], p["new"], p["repeat"], int8)]
    rows.append(prefill_case(hf, ours, p["prefill"], p["repeat"]))
    print_table(rows, ["case", "ssmkit_tok_per_s", "transformers_tok_per_s", "speedup", "ssmkit_s",
                       "transformers_s", "same_tokens", "rows_identical", "first_differing_step",
                       "last_logits_rel_err"])
    path = write_json("bench_generate", {
        "quick": args.quick, "threads": torch.get_num_threads(), "params": p, "model": ours.summary(), "rows": rows,
        "rss_bytes_end": current_rss_bytes(), "wall_s": time.perf_counter() - t0,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
