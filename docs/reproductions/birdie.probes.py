"""The recall probes of docs/reproductions/birdie.notes.md (a record of how they were run; not part of ssmkit).

A 2-layer d_model-64 model (``--model attn|mamba2|rglru``, from scratch, or ``--ckpt`` a pretrained checkpoint of
the reproduction) fine-tuned one thread with retrieval's recipe (AdamW, 10% warm-up, cosine to 10%, clip 1) on
one recall layout, then teacher-forced value accuracy at 4 and 8 (and 16) pairs. Layouts (``--fmt``):

* ``birdie``: the old reproduction's ``mqar_pair(..., interleaved=True)`` (values fed back after each query);
  ``noreset``: the same without the reset mask;
* ``zoo32``: ssmkit's Zoology MQAR task (vocabulary 64, length 32, N pairs) as raw sequences;
* ``lay<flags>``: raw sequences ``context, queries``: s = the prefix specials (<|PREFIX_LM|> ... [SEP] [START]),
  f = a random filler after each query instead of its value, c = queries back to back (value not fed back),
  neither = each query followed by its value, d = distinct values, z = Zoology ids (keys 1-31, values 32-63),
  l = letters (keys a-z, values A-Z), else byte ids (keys 0..K-1, values 128..128+K-1).

Run from the repository root, e.g. ``python docs/reproductions/birdie.probes.py --fmt laysdcl --qf 1.0
--steps 1000 --lr 1e-3 --ckpt runs/.../checkpoints/step-00000150``.
"""
import argparse, json, math, time, functools
import numpy as np, torch
from ssmkit.data.corpora import tiny_shakespeare_path
from ssmkit.objectives.text_task import ObjectiveText
from ssmkit.objectives.objectives import Pair
from ssmkit.train.presets import resolve_model
from ssmkit.models import CausalLM, load_pretrained
from ssmkit.experiments import retrieval as R

p = argparse.ArgumentParser()
p.add_argument("--model", default="attn"); p.add_argument("--d", type=int, default=64)
p.add_argument("--steps", type=int, default=600); p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--wd", type=float, default=0.0)
p.add_argument("--beta2", type=float, default=0.999); p.add_argument("--warm", type=float, default=0.1)
p.add_argument("--keys", type=int, default=32); p.add_argument("--qf", type=float, default=0.5)
p.add_argument("--minp", type=int, default=2); p.add_argument("--maxp", type=int, default=8)
p.add_argument("--fmt", default="birdie")  # birdie | plain | noreset
p.add_argument("--distinct_values", type=int, default=0)
p.add_argument("--seed", type=int, default=0); p.add_argument("--ckpt", default=None)
p.add_argument("--scorekeys", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
task = ObjectiveText(path=str(tiny_shakespeare_path()), seq_len=256, val_fraction=0.05, num_placeholders=64)
vocab = task.vocab
if a.ckpt:
    model = load_pretrained(a.ckpt)
else:
    if a.model == "attn":
        m = {"preset": "attn", "pattern": "attn*2", "mixer_options": {"attn": {"n_heads": 4, "rotary": True}}}
    else:
        m = {"preset": a.model, "pattern": f"{a.model}*2"}
    m.update(head="CausalLM", d_model=a.d, mlp="swiglu", mlp_ratio=2.0)
    model = CausalLM(resolve_model(m, task).config)
print("vocab", vocab.base_vocab_size, "model vocab", model.config.vocab_size if hasattr(model, "config") else "?")

def make_pair(rng, n=None):
    n = n or int(rng.integers(a.minp, a.maxp + 1))
    q = R.mqar_queries(n, a.qf)
    pr = R.mqar_pair(vocab, rng, n, q, num_keys=a.keys, interleaved=True)
    if a.distinct_values:
        pass
    return pr

def batch_of(pairs):
    if a.fmt.startswith("zoo"):
        return pairs
    b = R._batch(pairs, max(pp.packed_len for pp in pairs), task.pad_id, vocab.start_id)
    return b

if a.fmt.startswith("lay"):
    # lay<flags>: s = specials, f = random fillers between queries (value not fed back), d = distinct values,
    # z = zoology ids (keys 1..31, values 32..63)
    fl = a.fmt[3:]
    def make_pair(rng, n=None):
        n = n or int(rng.integers(a.minp, a.maxp + 1)); m = R.mqar_queries(n, a.qf)
        if "l" in fl:
            keys = 97 + rng.choice(26, n, replace=False); vbase, vk = 65, 26
        elif "z" in fl:
            keys = rng.choice(np.arange(1, 32), n, replace=False); vbase, vk = 32, 32
        else:
            keys = rng.choice(a.keys, n, replace=False); vbase, vk = vocab.base_vocab_size // 2, a.keys
        vals = vbase + (rng.choice(vk, n, replace=False) if "d" in fl else rng.integers(0, vk, n))
        asked = rng.choice(n, m, replace=False)
        ids = [vocab.paradigm_id("prefix_lm")] if "s" in fl else []
        for k, v in zip(keys, vals): ids += [k, v]
        if "s" in fl: ids += [vocab.sep_id, vocab.start_id]
        lab = [-100] * len(ids)
        for q in asked:
            ids.append(keys[q]); lab.append(vals[q])
            if "c" in fl:
                pass
            elif "f" in fl:
                ids.append(int(rng.integers(0, 64 if "z" in fl else vocab.base_vocab_size))); lab.append(-100)
            else:
                ids.append(vals[q]); lab.append(-100)
        # labels are the next-token targets at each position: lab[t] = target of output t
        return {"input_ids": np.array(ids), "labels": np.array(lab)}
    def batch_of(pairs):
        L = max(len(e["input_ids"]) for e in pairs)
        ids = torch.full((len(pairs), L), task.pad_id); lab = torch.full((len(pairs), L), -100)
        for i, e in enumerate(pairs):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"]); lab[i, :len(e["labels"])] = torch.tensor(e["labels"])
        return {"input_ids": ids, "labels": lab, "z": True}

if a.fmt.startswith("zoo"):
    from ssmkit.data.recall import MQAR, MQARParams
    zl = int(a.fmt[3:] or 32); _tasks = {}
    def make_pair(rng, n=None):
        n = n or 4
        t = _tasks.setdefault(n, MQAR(vocab_size=64, seq_len=zl, num_pairs=n))
        ex = t._example(rng)
        return ex
    _bo = batch_of
    def batch_of(pairs):
        ids = torch.tensor(np.stack([e["input_ids"] for e in pairs])); lab = torch.tensor(np.stack([e["labels"] for e in pairs]))
        return {"input_ids": ids, "labels": lab, "z": True}

def run(model, b, **kw):
    if a.fmt == "noreset" or "z" in b:
        return model(b["input_ids"], **kw)
    return R._run(model, b, **kw)

rng = np.random.default_rng([a.seed, 7])
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, a.beta2))
warm = max(1, int(a.steps * a.warm))
t0 = time.perf_counter(); losses = []
model.train()
for step in range(a.steps):
    scale = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm)))
    for g in opt.param_groups: g["lr"] = a.lr * scale
    b = batch_of([make_pair(rng) for _ in range(a.batch)])
    labels = b["labels"] if a.scorekeys or "z" in b else R.mqar_loss_mask(vocab, b["labels"])
    out = run(model, b, labels=labels)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    losses.append(float(out.loss))
model.eval()
res = {}
with torch.no_grad():
    for n in ((4, 8, 16) if a.maxp >= 16 else (4, 8)):
        r2 = np.random.default_rng([2024, n]); right = tot = 0
        for _ in range(4):
            b = batch_of([make_pair(r2, n) for _ in range(32)])
            pred = run(model, b).logits.argmax(-1)
            sc = (b["labels"] >= 0) if "z" in b and "lay" in a.fmt else (b["labels"] >= 0) if "z" in b else (b["labels"] >= vocab.base_vocab_size // 2) & (b["labels"] != vocab.done_id)
            right += int(((pred == b["labels"]) & sc).sum()); tot += int(sc.sum())
        res[n] = round(100 * right / tot, 1)
blocks = [round(float(np.mean(losses[i:i + a.steps // 6])), 2) for i in range(0, a.steps, a.steps // 6)]
print(json.dumps({"args": vars(a), "acc": res, "time": round(time.perf_counter() - t0), "loss_blocks": blocks}))
