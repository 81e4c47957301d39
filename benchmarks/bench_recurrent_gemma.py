"""RecurrentGemma speed: ssmkit vs transformers on a RecurrentGemma-shaped model with random weights, converted with
ssmkit.interop so both sides hold identical weights, in one process, one thread (ratios, not absolute times).

    python benchmarks/bench_recurrent_gemma.py [--quick]

Model: d_model 256, 6 layers (recurrent, recurrent, attention) * 2, 4 heads (MQA, window 128), lru_width 256, MLP
384 wide, vocab 1024. Cases, batch 1 and 8:
- prefill: one forward over a 512-token prompt (transformers without a cache; ssmkit without a state);
- generate: a 64-token prompt and 64 greedy tokens with both generate functions (tokens compared).
``--quick``: 128-token prefill, 16 new tokens. Writes benchmarks/results/bench_recurrent_gemma.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import transformers

    from ssmkit.infer import generate
    from ssmkit.interop import from_transformers

    transformers.logging.set_verbosity_error()
    prefill, new = (128, 16) if args.quick else (512, 64)
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, attention_window_size=128, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(cfg).eval()
    ours = from_transformers(hf)
    rows = []
    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randint(0, 1024, (batch, prefill), generator=torch.Generator().manual_seed(batch))
            t_hf = best_time(lambda x=x: hf(x, use_cache=False))
            t_ours = best_time(lambda x=x: ours(x))
            rows.append({"case": f"prefill {prefill}", "batch": batch, "transformers_s": t_hf, "ssmkit_s": t_ours,
                         "speedup": t_hf / t_ours})
            p = x[:, :64]
            kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            t_hf = best_time(lambda p=p, kw=kw: hf.generate(p, **kw), repeat=2)
            t_ours = best_time(lambda p=p: generate(ours, p, new), repeat=2)
            same = torch.equal(hf.generate(p, **kw)[:, 64:], generate(ours, p, new))
            rows.append({"case": f"generate 64+{new}", "batch": batch, "transformers_s": t_hf, "ssmkit_s": t_ours,
                         "speedup": t_hf / t_ours, "same_tokens": same})
    print_table(rows, ["case", "batch", "transformers_s", "ssmkit_s", "speedup", "same_tokens"])
    print(write_json("bench_recurrent_gemma", {"quick": args.quick, "rows": rows}))


if __name__ == "__main__":
    main()
