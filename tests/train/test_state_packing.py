"""Tensors inside trainer state (e.g. a batch source's reward model) survive a checkpoint via safetensors + JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssmkit.train.checkpoints import pack_state, unpack_state


def test_pack_unpack_round_trip_is_exact_and_json_clean():
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt.zero_grad()
    sum(p.sum() for g in opt.param_groups for p in g["params"]).backward()
    opt.step()
    state = {"model": {"w": torch.randn(2, 3), "b": torch.arange(4)}, "optimizer": opt.state_dict(),
             "arr": np.arange(6.0).reshape(2, 3), "tuple": (1, 2.5, "x"), "int_keys": {0: "a", 5: [1, (2, 3)]},
             "np_scalar": np.float64(0.25), "none": None, "nested": [{"t": torch.ones(1)}]}
    tensors: dict[str, torch.Tensor] = {}
    packed = pack_state(state, tensors)
    text = json.dumps(packed)  # JSON-serialisable
    back = unpack_state(json.loads(text), tensors)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and torch.equal(back["model"]["b"], state["model"]["b"])
    assert back["tuple"] == (1, 2.5, "x") and back["int_keys"] == {0: "a", 5: [1, (2, 3)]}
    assert np.array_equal(back["arr"], state["arr"]) and back["np_scalar"] == 0.25 and back["none"] is None
    assert torch.equal(back["nested"][0]["t"], torch.ones(1))
    # an optimizer loads the unpacked state and holds the same moments
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(opt2.state_dict()["state"][k][name]), torch.as_tensor(v))
    # the packed copy does not alias the live tensors
    state["model"]["w"].add_(1.0)
    assert not torch.equal(back["model"]["w"], state["model"]["w"])


def test_pack_rejects_unknown_objects_and_unpack_missing_tensor():
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_state({"x": object()}, {})
    with pytest.raises(ValueError, match="refers to tensor 'state.0'"):
        unpack_state({"__tensor__": "state.0"}, {})
