"""Build the ONNX prefill graph from the step graph: a ``Loop`` over the prompt whose body is the step.

    prefill(input_ids (B, L) int64) -> logits (B, L, vocab), state_out.* (every layer's state after the prompt)

The loop starts from zero states (empty KV caches), gathers token ``t`` of ``input_ids`` each iteration, and
collects the step's logits as its scan output. The body is the step graph itself (its weights are stored in
both files), so prefill and step compute the same recurrence: prefill costs L steps.
"""

from __future__ import annotations

from typing import Any

STEP_TOKEN = "token"
LOGITS = "logits"


def state_in(name: str) -> str:
    return f"state_in.{name}"


def state_out(name: str) -> str:
    return f"state_out.{name}"


def prefill_from_step(step: Any, states: list[dict[str, Any]]) -> Any:
    """The prefill ModelProto from the step ModelProto. ``states``: [{"name", "shape" (ints; "batch" and
    "cache" symbolic), "dtype": "float32" | "int64"}] in the step graph's input order."""
    import onnx
    from onnx import TensorProto, helper

    g = step.graph
    want_in = [STEP_TOKEN] + [state_in(s["name"]) for s in states]
    want_out = [LOGITS] + [state_out(s["name"]) for s in states]
    if [i.name for i in g.input] != want_in or [o.name for o in g.output] != want_out:
        raise RuntimeError(f"step graph has inputs {[i.name for i in g.input]} and outputs "
                           f"{[o.name for o in g.output]}; expected {want_in} and {want_out}")
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}

    # ---- loop body: (iter, cond, states...) -> (cond, states..., logits)
    # the step's outputs are renamed inside the body: the outer graph uses their names for the loop's results
    rename = {n: f"body.{n}" for n in want_out}
    step_nodes = []
    for node in g.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
        step_nodes.append(node)
    body_nodes = [helper.make_node("Gather", ["input_ids", "body.iter"], [STEP_TOKEN], axis=1),
                  *step_nodes, helper.make_node("Identity", ["body.cond_in"], ["body.cond_out"])]
    body_outputs = [helper.make_tensor_value_info("body.cond_out", TensorProto.BOOL, [])]
    for s in states:
        body_outputs.append(helper.make_tensor_value_info(rename[state_out(s["name"])], types[s["dtype"]], None))
    body_outputs.append(helper.make_tensor_value_info(rename[LOGITS], TensorProto.FLOAT, None))
    body_inputs = [helper.make_tensor_value_info("body.iter", TensorProto.INT64, []),
                   helper.make_tensor_value_info("body.cond_in", TensorProto.BOOL, []),
                   *[i for i in g.input if i.name != STEP_TOKEN]]
    body = helper.make_graph(body_nodes, "step_body", body_inputs, body_outputs,
                             initializer=list(g.initializer),
                             value_info=[v for v in g.value_info if v.name not in rename])

    # ---- outer graph: zero states, the loop, logits to batch-first
    nodes = [helper.make_node("Shape", ["input_ids"], ["prefill.shape"]),
             helper.make_node("Constant", [], ["prefill.zero"], value=helper.make_tensor("", TensorProto.INT64,
                                                                                          [], [0])),
             helper.make_node("Constant", [], ["prefill.one"], value=helper.make_tensor("", TensorProto.INT64,
                                                                                         [], [1])),
             helper.make_node("Gather", ["prefill.shape", "prefill.zero"], ["prefill.batch_scalar"]),
             helper.make_node("Unsqueeze", ["prefill.batch_scalar", "prefill.axes0"], ["prefill.batch"]),
             helper.make_node("Gather", ["prefill.shape", "prefill.one"], ["prefill.length"]),
             helper.make_node("Constant", [], ["prefill.cond"], value=helper.make_tensor("", TensorProto.BOOL,
                                                                                          [], [True]))]
    inits = [helper.make_tensor("prefill.axes0", TensorProto.INT64, [1], [0])]
    loop_in = ["prefill.length", "prefill.cond"]
    for s in states:
        rest = [0 if d == "cache" else int(d) for d in s["shape"][1:]]
        inits.append(helper.make_tensor(f"prefill.rest.{s['name']}", TensorProto.INT64, [len(rest)], rest))
        nodes.append(helper.make_node("Concat", ["prefill.batch", f"prefill.rest.{s['name']}"],
                                      [f"prefill.shape.{s['name']}"], axis=0))
        nodes.append(helper.make_node("ConstantOfShape", [f"prefill.shape.{s['name']}"],
                                      [f"prefill.init.{s['name']}"],
                                      value=helper.make_tensor("", types[s["dtype"]], [1], [0])))
        loop_in.append(f"prefill.init.{s['name']}")
    loop_out = [state_out(s["name"]) for s in states] + ["prefill.logits_lbv"]
    nodes.append(helper.make_node("Loop", loop_in, loop_out, body=body))
    nodes.append(helper.make_node("Transpose", ["prefill.logits_lbv"], [LOGITS], perm=[1, 0, 2]))
    vocab = g.output[0].type.tensor_type.shape.dim[-1]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "length", vocab.dim_value])]
    for s in states:
        shape = ["batch", *[("cache" if d == "cache" else int(d)) for d in s["shape"][1:]]]
        outputs.append(helper.make_tensor_value_info(state_out(s["name"]), types[s["dtype"]], shape))
    graph = helper.make_graph(nodes, "prefill", [helper.make_tensor_value_info(
        "input_ids", TensorProto.INT64, ["batch", "length"])], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(step.opset_import), ir_version=step.ir_version,
                              functions=list(step.functions), producer_name="ssmkit")
    onnx.checker.check_model(model)
    return model
