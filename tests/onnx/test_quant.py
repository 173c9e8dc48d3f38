"""edgeft.onnx.quant: graph rewrites of the fp16 conversion, on hand-built graphs."""

from __future__ import annotations


def test_drop_cast_round_trips_rewires_to_the_fp32_value():
    from onnx import TensorProto, helper

    from edgeft.onnx.quant import drop_cast_round_trips

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="blocked1"),
             helper.make_node("Cast", ["a"], ["a16"], name="a_cast_to_fp16_node", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["a16"], ["a32"], name="a16_cast_to_fp32_node", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["a32"], ["y"], name="blocked2"),
             helper.make_node("Neg", ["a16"], ["z"], name="half_consumer")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2])])
    assert drop_cast_round_trips(g) == 1
    by = {n.name: n for n in g.node}
    assert list(by["blocked2"].input) == ["a"]  # reads the fp32 value
    assert "a16_cast_to_fp32_node" not in by
    assert "a_cast_to_fp16_node" in by  # still feeds an fp16 consumer
