"""The ascend profile and its checker, on small hand-built graphs with seeded violations."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.ascend.checker import AscendCheckError, check, check_or_raise
from targets.ascend.profile import ALL_SOCS, AscendProfileError, make_profile, validate_soc

P = make_profile()  # Ascend910B3, mixed_float16


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 9
    return m


def _vi(name, dt, shape):
    return helper.make_tensor_value_info(name, dt, shape)


def _clean():
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                   helper.make_node("Softmax", ["y"], ["z"], name="sm")],
                  [_vi("x", TensorProto.FLOAT, [2, 4])], [_vi("z", TensorProto.FLOAT, [2, 3])],
                  [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])


def _find(vs, node):
    return [v for v in vs if v.node == node]


def test_clean_graph_passes():
    assert check(_clean(), P) == []
    check_or_raise(_clean(), P)


def test_opset_20_reported():
    m = _clean()
    m.opset_import[0].version = 20
    vs = check(m, P)
    assert any(v.op == "opset" and "20" in v.reason and "9..18" in v.reason for v in vs)


def test_op_outside_profile_and_foreign_domain():
    m = _model([helper.make_node("Det", ["x"], ["y"], name="det"),
                helper.make_node("FusedMatMul", ["x", "x"], ["z"], name="fused", domain="com.microsoft")],
               [_vi("x", TensorProto.FLOAT, [4, 4])], [_vi("y", TensorProto.FLOAT, []), _vi("z", TensorProto.FLOAT, [4, 4])],
               extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    vs = check(m, P)
    assert _find(vs, "det")[0].op == "Det" and "operator list" in _find(vs, "det")[0].reason
    assert "com.microsoft" in _find(vs, "fused")[0].reason


def test_cast_to_int64_and_bf16():
    m = _model([helper.make_node("Cast", ["x"], ["y"], name="to_i64", to=TensorProto.INT64),
                helper.make_node("Cast", ["x"], ["z"], name="to_bf16", to=TensorProto.BFLOAT16),
                helper.make_node("Cast", ["x"], ["w"], name="to_i32", to=TensorProto.INT32)],
               [_vi("x", TensorProto.FLOAT, [3])],
               [_vi("y", TensorProto.INT64, [3]), _vi("z", TensorProto.BFLOAT16, [3]), _vi("w", TensorProto.INT32, [3])])
    vs = check(m, P)
    assert "int64" in _find(vs, "to_i64")[0].reason
    assert any("bfloat16" in v.reason for v in _find(vs, "to_bf16"))
    assert _find(vs, "to_i32") == []


def test_nonzero_is_data_dependent():
    m = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")],
               [_vi("x", TensorProto.FLOAT, [3])], [_vi("y", TensorProto.INT64, [1, None])])
    (v,) = _find(check(m, P), "nz")
    assert v.op == "NonZero" and "depends on the data" in v.reason


def test_einsum_equations():
    def es(eq):
        return _model([helper.make_node("Einsum", ["a", "b"], ["c"], name="es", equation=eq)],
                      [_vi("a", TensorProto.FLOAT, [2, 3, 4]), _vi("b", TensorProto.FLOAT, [4, 5])],
                      [_vi("c", TensorProto.FLOAT, None)])
    assert _find(check(es("abc,cd->abd"), P), "es") == []
    (v,) = _find(check(es("abc,cd->dab"), P), "es")
    assert "abc,cd->dab" in v.reason and "supported" in v.reason


def test_topk_scatternd_dtypes_and_indices():
    topk = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="tk")],
                  [_vi("x", TensorProto.INT32, [2, 8])], [_vi("v", TensorProto.INT32, [2, 2]), _vi("i", TensorProto.INT64, [2, 2])],
                  [numpy_helper.from_array(np.array([2], np.int64), "k")])
    assert "float16/float32" in _find(check(topk, P), "tk")[0].reason
    neg = _model([helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], name="sc")],
                 [_vi("d", TensorProto.FLOAT, [4, 2]), _vi("u", TensorProto.FLOAT, [1, 2])], [_vi("y", TensorProto.FLOAT, [4, 2])],
                 [numpy_helper.from_array(np.array([[-1]], np.int64), "idx")])
    assert "negative" in _find(check(neg, P), "sc")[0].reason
    runtime = _model([helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], name="sc")],
                     [_vi("d", TensorProto.FLOAT, [4, 2]), _vi("idx", TensorProto.INT64, [1, 1]),
                      _vi("u", TensorProto.FLOAT, [1, 2])], [_vi("y", TensorProto.FLOAT, [4, 2])])
    assert "run time" in _find(check(runtime, P), "sc")[0].reason


def test_fp32_matmul_depends_on_precision_mode():
    assert check(_clean(), make_profile(precision_mode="force_fp16")) == []
    (v,) = check(_clean(), make_profile(precision_mode="origin"))
    assert v.node == "mm" and v.op == "MatMul" and "fp32" in v.reason


def test_dynamic_input_reported():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")],
               [_vi("x", TensorProto.FLOAT, ["batch", 4])], [_vi("y", TensorProto.FLOAT, ["batch", 4])])
    vs = check(m, P)
    assert vs and vs[0].node == "<input:x>" and "static" in vs[0].reason


def test_check_or_raise_lists_every_violation():
    m = _model([helper.make_node("Cast", ["x"], ["y"], name="c64", to=TensorProto.INT64),
                helper.make_node("NonZero", ["x"], ["z"], name="nz")],
               [_vi("x", TensorProto.FLOAT, [3])], [_vi("y", TensorProto.INT64, [3]), _vi("z", TensorProto.INT64, None)],
               opset=20)
    with pytest.raises(AscendCheckError) as e:
        check_or_raise(m, P, what="seeded.onnx")
    msg = str(e.value)
    assert "seeded.onnx" in msg and "c64 (Cast)" in msg and "nz (NonZero)" in msg and "opset" in msg
    assert len(e.value.violations) == 3


def test_soc_versions():
    for soc in ("Ascend910B1", "Ascend910B4-1", "Ascend910_9391", "Ascend910_9362", "Ascend310P3", "Ascend310P7"):
        assert validate_soc(soc) == soc
    with pytest.raises(AscendProfileError) as e:
        make_profile("Ascend910X")
    assert "Ascend910X" in str(e.value) and all(s in str(e.value) for s in ALL_SOCS)
    with pytest.raises(AscendProfileError, match="bf16"):
        make_profile("Ascend310P3", "mixed_bfloat16")
    with pytest.raises(AscendProfileError, match="precision"):
        make_profile("Ascend910B3", "fp64")
