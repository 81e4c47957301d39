"""``ssmkit generate``: continue a prompt with a trained run's (or a saved model's) language model."""

from __future__ import annotations

import argparse
import itertools
import re
import time
from pathlib import Path
from typing import Any

from .common import UsageError, float_in, int_at_least, load_run, setup_logging


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("generate", help="generate tokens from a trained language model", formatter_class=fmt,
                       description=(
        "Continue a prompt with a trained run's language model (prefill, then O(1) recurrent steps), or with\n"
        "a model directory written by save_pretrained (e.g. one converted with from_transformers).\n"
        "Text tasks (with a tokenizer) take text and print text; synthetic tasks take token ids\n"
        "('5 9 12' or '5,9,12') and print ids. --example I builds the prompt from validation example I\n"
        "(up to its first scored position) and shows the expected tokens. Decoding is greedy unless\n"
        "--temperature > 0 (as in transformers' generate)."), epilog=(
        "examples:\n  ssmkit generate runs/demo --example 0 1 2\n"
        "  ssmkit generate runs/demo --prompt '0 0 5 0 7 0 0 1'\n"
        "  ssmkit generate runs/text --prompt 'Once upon a time' --max-new-tokens 100 --temperature 0.8\n"
        "  ssmkit generate models/mamba-130m --prompt 'Hello'   (a model directory with its tokenizer.json)\n"
        "  ssmkit generate runs/text --prompt 'ROMEO:' --draft runs/small --num-draft 4   (speculative)"))
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoints/step-* dirs), "
                                                      "or a model directory (config.json + model.safetensors)")
    p.add_argument("--prompt", help="prompt text (with a tokenizer) or token ids (synthetic tasks)")
    p.add_argument("--example", type=int_at_least(0), nargs="+", metavar="INDEX",
                   help="use validation example(s) INDEX as prompts and show the expected tokens")
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="'byte', 'gpt2' or a tokenizer.json file (default: the run's task tokenizer, or a model "
                        "directory's own tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int_at_least(1),
                   help="tokens to generate (default: the expected answer's length with --example, 64 for "
                        "text, 8 for ids)")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0,
                   help="0 = greedy (default), > 0 = sampling")
    p.add_argument("--top-k", type=int_at_least(1), help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int_at_least(0), help="sampling seed")
    p.add_argument("--escapes", action="store_true", help="decode backslash escapes (\\n) in a text --prompt")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="decode with int8 weight-only linear layers (faster, "
                                                          "approximate: see ssmkit.infer.quantize)")
    quant.add_argument("--int4", action="store_true", help="decode with 4-bit weights, one scale per 32 inputs "
                                                          "(an eighth of the bytes, approximate: docs/quantization.md)")
    p.add_argument("--int8-activations", action="store_true",
                   help="with --int8 or --int4: also quantize each layer input to int8 per block of 32 and multiply "
                        "in integers (faster decode; accuracy in docs/quantization.md)")
    p.add_argument("--draft", metavar="DRAFT_RUN",
                   help="speculative decoding with this run's (or model directory's) smaller model as the draft "
                        "(same vocabulary and tokenizer), or 'self:N' for the model's own first N layers; the "
                        "output is the same as without it")
    p.add_argument("--num-draft", type=int_at_least(1), metavar="K",
                   help="tokens the draft proposes per round (default 4; needs --draft)")
    p.add_argument("--tree", metavar="B,D", help="tree drafts: the draft's top-B tokens per level to depth D "
                                                 "(greedy only; needs --draft)")
    p.set_defaults(func=run)


def _is_model_dir(path: Path) -> bool:
    """A save_pretrained directory that is not a training checkpoint."""
    from ..models.checkpoint import WEIGHTS_NAME
    from ..train.checkpoints import STATE_JSON

    return (path / WEIGHTS_NAME).is_file() and not (path / STATE_JSON).is_file()


def _load(path: str) -> tuple[Path, Any, Any, dict | None]:
    """(checkpoint dir, task or None, model, run config or None)."""
    p = Path(path)
    if _is_model_dir(p):
        from ..models import load_pretrained

        return p, None, load_pretrained(p), None
    _, ckpt, task, model, config = load_run(path)
    return ckpt, task, model, config


def _tokenizer(args: argparse.Namespace, ckpt: Path, config: dict | None, vocab_size: int) -> Any:
    """--tokenizer; else a bare model directory's own tokenizer.json; else the run's task tokenizer; else None."""
    from ..data import get_tokenizer

    name = args.tokenizer
    if name is None and config is None and (ckpt / "tokenizer.json").is_file():
        name = str(ckpt / "tokenizer.json")
    if name is not None:
        try:
            tok = get_tokenizer(name)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--tokenizer {name!r}: {e}") from None
        if tok.vocab_size > vocab_size:
            raise UsageError(f"--tokenizer {name!r} has {tok.vocab_size} tokens, more than the model's "
                             f"vocab_size={vocab_size}")
        return tok
    params = (config or {}).get("task", {})
    if "tokenizer" not in params:
        return None
    return get_tokenizer(params["tokenizer"], params.get("bpe_dir") or None)


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise UsageError("--prompt is empty; give token ids separated by spaces or commas, e.g. "
                         "--prompt '5 9 12'")
    ids = []
    for p in parts:
        try:
            ids.append(int(p))
        except ValueError:
            raise UsageError(f"--prompt: {p!r} is not a token id; this model takes token ids in "
                             f"[0, {vocab_size}) separated by spaces or commas (or give --tokenizer)") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"--prompt: token id {bad[0]} is outside [0, vocab_size={vocab_size})")
    return ids


def _example_prompt(task: Any, index: int) -> tuple[list[int], list[int]]:
    """(prompt ids, expected continuation) from validation example ``index``: the prompt ends at the first
    scored position (for language modelling, where nearly every position is scored, at the middle); the
    expected continuation is the run of labels that the following inputs repeat (teacher forcing): at least
    one token, at most 64."""
    n = task.num_examples("val")
    if not 0 <= index < n:
        raise UsageError(f"--example {index}: the validation split has examples 0..{n - 1}")
    batch = next(itertools.islice(task.batches("val", 1, 0), index, None))
    ids = batch["input_ids"][0]
    labels = batch["labels"][0]
    if "mask" in batch:
        keep = int(batch["mask"][0].sum())
        ids, labels = ids[:keep], labels[:keep]
    scored = (labels != -100).nonzero().flatten().tolist()
    if not scored:
        raise UsageError(f"--example {index}: the example has no scored position")
    dense = len(scored) >= len(ids) // 2  # language modelling: (nearly) every position is scored
    start = len(ids) // 2 if dense else 0
    p = next((s for s in scored if s >= start), scored[0])
    expected = [int(labels[p])]
    q = p + 1
    while (q < len(ids) and len(expected) < 64 and labels[q] != -100
           and int(ids[q]) == int(labels[q - 1])):
        expected.append(int(labels[q]))
        q += 1
    return [int(i) for i in ids[: p + 1]], expected


def _draft(args: argparse.Namespace, model: Any, config: dict | None) -> tuple[Any, tuple[int, int] | None]:
    """The draft model of --draft (None without it) and the --tree shape; one-line errors."""
    from ..infer import self_draft
    from ..models import CausalLM

    if args.draft is None:
        if args.num_draft is not None or args.tree is not None:
            raise UsageError("--num-draft and --tree need --draft DRAFT_RUN (or --draft self:N)")
        return None, None
    tree = None
    if args.tree is not None:
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", args.tree)
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise UsageError(f"--tree must be B,D (branches, depth), two ints >= 1, got {args.tree!r}")
        tree = (int(m[1]), int(m[2]))
    if args.draft.startswith("self:"):
        try:
            return self_draft(model, int(args.draft[5:])), tree
        except ValueError as e:
            raise UsageError(f"--draft {args.draft}: {e}") from None
    _, _, draft, draft_config = _load(args.draft)
    if not isinstance(draft, CausalLM):
        raise UsageError(f"--draft {args.draft} holds a {type(draft).__name__}, not a language model")
    if draft.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--draft {args.draft} has vocab_size={draft.config.vocab_size} but the model has "
                         f"{model.config.vocab_size}; the draft must share the model's tokenizer")
    mine, theirs = ((c or {}).get("task", {}).get("tokenizer") for c in (config, draft_config))
    if mine is not None and theirs is not None and mine != theirs:
        raise UsageError(f"--draft {args.draft} uses tokenizer {theirs!r} but the model uses {mine!r}")
    return draft, tree


def run(args: argparse.Namespace) -> int:
    import torch

    from ..infer import generate, quantize_weights, speculative_generate
    from ..models import CausalLM

    setup_logging(True)
    if (args.prompt is None) == (args.example is None):
        raise UsageError("give exactly one of --prompt TEXT_OR_IDS and --example INDEX")
    ckpt, task, model, config = _load(args.run_dir)
    if not isinstance(model, CausalLM):
        what = f"the {task.kind} task {task.name!r}" if task is not None else "no task"
        raise UsageError(f"generate needs a language model; {args.run_dir} holds a {type(model).__name__} for "
                         f"{what} (use `ssmkit eval` instead)")
    if args.example is not None and task is None:
        raise UsageError(f"--example needs a run directory with a task; {args.run_dir} is a bare model "
                         f"directory (use --prompt)")
    if args.int8_activations and not (args.int8 or args.int4):
        raise UsageError("--int8-activations needs --int8 or --int4 (weights quantized first)")
    if args.int8 or args.int4:
        model = quantize_weights(model, bits=4 if args.int4 else 8,
                                 activations="int8" if args.int8_activations else "float")
    vocab = model.config.vocab_size
    tok = _tokenizer(args, ckpt, config, vocab)
    if args.top_k is not None and args.top_k > vocab:
        raise UsageError(f"--top-k {args.top_k} is larger than the model's vocab_size={vocab}")
    if args.example is not None:
        jobs = [(i, *_example_prompt(task, i)) for i in args.example]
    elif tok is not None:
        text = args.prompt.encode("utf-8").decode("unicode_escape") if args.escapes else args.prompt
        jobs = [(None, tok.encode(text), None)]
        if not jobs[0][1]:
            raise UsageError("--prompt is empty")
    else:
        jobs = [(None, _parse_ids(args.prompt, vocab), None)]
    eos = getattr(tok, "eos_id", None) if tok is not None else None

    def show(ids: list[int]) -> str:
        return repr(tok.decode(ids)) if tok is not None else " ".join(map(str, ids))

    draft, tree = _draft(args, model, config)
    print(f"checkpoint: {ckpt}")
    total_hits = total = 0
    for index, prompt, expected in jobs:
        n_new = args.max_new_tokens
        if n_new is None:
            n_new = len(expected) if expected is not None else (64 if tok is not None else 8)
        kw = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "eos_token_id": eos,
              "seed": args.seed}
        start = time.perf_counter()
        if draft is None:
            out = generate(model, torch.tensor([prompt]), n_new, **kw)[0].tolist()
            spec = ""
        else:
            try:
                out_t, stats = speculative_generate(model, torch.tensor([prompt]), n_new, draft_model=draft,
                                                    num_draft=args.num_draft or 4, tree=tree, **kw)
            except ValueError as e:
                raise UsageError(str(e)) from None
            out = out_t[0].tolist()
            spec = (f", acceptance rate {stats.acceptance_rate:.2f}, {stats.tokens_per_pass:.2f} tokens per "
                    f"target pass")
        rate = len(out) / max(time.perf_counter() - start, 1e-9)
        if eos is not None and eos in out:
            out = out[: out.index(eos) + 1]
        head = "" if index is None else f"example {index}: "
        print(f"{head}prompt ({len(prompt)} tokens): {show(prompt)}")
        print(f"{' ' * len(head)}generated ({len(out)} tokens): {show(out)}")
        print(f"{' ' * len(head)}{rate:.1f} tokens/s{spec}")
        if expected is not None:
            hits = sum(a == b for a, b in zip(out, expected, strict=False))
            total_hits, total = total_hits + hits, total + len(expected)
            print(f"{' ' * len(head)}expected: {show(expected)}   ({hits}/{len(expected)} tokens match)")
    if total and len(jobs) > 1:
        print(f"{total_hits}/{total} expected tokens generated")
    return 0
