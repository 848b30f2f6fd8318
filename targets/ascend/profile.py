"""What ATC (CANN 7/8, ONNX framework 5) accepts: the `ascend` target profile (REFERENCE.md section 3).

Sources: the CANN ONNX operator list ("atlasoxol") and the ATC parameter reference. Every rule the
checker enforces is here, as data:

- opset: default domain 9..18 (graphs are exported at 20 and converted to 18 with onnx's version
  converter); no other domain (com.microsoft ops do not exist on Ascend).
- ops: ALLOWED_OPS, plus per-op rules:
    Cast      `to` only bool / fp16 / fp32 / int8 / int16 / int32 (no int64, no bf16)
    TopK      X fp16 / fp32
    ScatterND data fp16 / fp32; indices must be provably non-negative (a constant >= 0)
    Einsum    two inputs and one of EINSUM_EQUATIONS (the 20 listed in the operator list)
    NonZero   rejected: its output shape depends on the data; fixed shapes and `--dynamic_dims`
              gears cannot express that (any other op whose output shape stays unknown after shape
              inference is rejected for the same reason)
    MatMul / Gemm  documented for fp16. fp32 MatMul/Gemm in the ONNX file is accepted when the
              precision mode makes ATC compute cube ops in fp16/bf16 (force_fp16, allow_fp32_to_fp16,
              allow_mix_precision*, fp16, mixed_float16, mixed_bfloat16): ATC inserts the casts, as
              for every fp32 model it converts. Under must_keep_origin_dtype / origin it is a
              violation (ATC would need an fp32 cube kernel the operator list does not document).
- tensors: no bf16 / fp8 / int4 / fp64 / complex / string values anywhere; graph inputs fully static.
- soc_version: SOC_VERSIONS; bf16 precision modes only on A2/A3 (910B, 910C) and 950.
- quantization (QUANT_SCHEMES): "none" (fp16 by the precision mode) or "w8a8" (targets/ascend/quant.py).
  No FP8 on 910B/910C. QuantizeLinear / DequantizeLinear are accepted only in a w8a8 profile, and only
  in the forms AMCT's QDQ ("QAT model") route documents or that opset 18 can express: int8, symmetric
  (zero point 0), constant fp32 scale, per-tensor or per-axis (1-D scale, opset 13 form), no block_size
  (blocked QDQ is opset 21). AMCT documents that such a model goes through `amct_onnx.convert_qat_model`
  before ATC; that step and ATC's acceptance are unverified here (see targets/ascend/quant.py).
  Quantized models take no high-precision mode (REFERENCE.md 3): must_keep_origin_dtype / origin are
  refused with w8a8.
"""
from __future__ import annotations

import dataclasses

import onnx_ir as ir

from models.errors import MlamoeError
from targets.base import TargetProfile


class AscendProfileError(MlamoeError):
    pass


SOC_VERSIONS: dict[str, tuple[str, ...]] = {
    "910B (Atlas A2)": ("Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4", "Ascend910B4-1"),
    "910C (Atlas A3)": ("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382",
                        "Ascend910_9372", "Ascend910_9362"),
    "310P": ("Ascend310P1", "Ascend310P3", "Ascend310P5", "Ascend310P7"),
    "950": ("Ascend950PR", "Ascend950DT"),
}
ALL_SOCS: tuple[str, ...] = tuple(s for group in SOC_VERSIONS.values() for s in group)
DEFAULT_SOC = "Ascend910B3"
BF16_SOC_FAMILIES = ("910B (Atlas A2)", "910C (Atlas A3)", "950")

# precision mode -> (atc flag, whether fp32 cube ops (MatMul/Gemm) are computed in fp16/bf16,
#                    whether --keep_dtype applies)
PRECISION_MODES: dict[str, tuple[str, bool, bool]] = {
    "force_fp16": ("--precision_mode", True, True),  # ATC's default
    "allow_fp32_to_fp16": ("--precision_mode", True, True),
    "allow_mix_precision": ("--precision_mode", True, True),
    "allow_mix_precision_fp16": ("--precision_mode", True, True),
    "must_keep_origin_dtype": ("--precision_mode", False, False),
    "fp16": ("--precision_mode_v2", True, True),
    "origin": ("--precision_mode_v2", False, False),
    "mixed_float16": ("--precision_mode_v2", True, True),
    "mixed_bfloat16": ("--precision_mode_v2", True, True),
}
MIXED_MODES = ("allow_mix_precision", "allow_mix_precision_fp16", "mixed_float16", "mixed_bfloat16")
BF16_MODES = ("mixed_bfloat16",)
DEFAULT_PRECISION = "mixed_float16"

OPSET_RANGE = (9, 18)
TARGET_OPSET = 18

ALLOWED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Identity
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu Range Reciprocal
ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize Round ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())
"""Default-domain ops of the CANN ONNX operator list that these graphs can meet (a subset; an op
outside it is reported, never silently accepted)."""

QUANT_SCHEMES = ("none", "w8a8")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
QDQ_DTYPES = frozenset({ir.DataType.INT8})
HIGH_PRECISION_MODES = ("must_keep_origin_dtype", "origin")

DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})

CAST_TARGETS = frozenset({ir.DataType.BOOL, ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.INT8,
                          ir.DataType.INT16, ir.DataType.INT32})
TOPK_DTYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.FLOAT})
SCATTERND_DTYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.FLOAT})
CUBE_OPS = ("MatMul", "Gemm")

EINSUM_EQUATIONS = frozenset({
    "abc,cde->abde", "abcd,aecd->aceb", "abcd,adbe->acbe", "abcd,cde->abe", "abc,cd->abd",
    "abc,dc->abd", "abc,abd->dc", "abc,dec->abde", "abc,abde->dec", "abcd,aecd->acbe",
    "abcd,acbe->aecd", "abcd,ecd->abe", "abcd,abe->ecd", "abcd,acbe->adbe", "abcd,abde->abce",
    "abcd,abce->abde", "abcd,aebd->aebc", "abcd,abce->acde", "abc,abd->acd", "ab,cb->ac",
})
"""The two-input equations the CANN ONNX operator list supports for Einsum (spaces ignored)."""

FORBIDDEN_VALUE_DTYPES = frozenset(
    d for d in (getattr(ir.DataType, n, None) for n in (
        "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
        "INT4", "UINT4", "FLOAT4E2M1", "DOUBLE", "COMPLEX64", "COMPLEX128", "STRING", "INT2", "UINT2"))
    if d is not None)


HBM_GB: dict[str, int] = {s: 64 for s in ("Ascend910B1", "Ascend910B2", "Ascend910B3")}
"""Device memory (HBM) of one NPU, GB (10**9 bytes), for the socs whose figure is sourced: Huawei's Atlas 800I A2 /
800T A2 server specifications (8 x Ascend 910B, 64 GB HBM per NPU). Other socs (910B4, whose servers ship 32 GB
variants, 910C, 310P, 950) have no figure here: the shape check then skips the HBM bound and says so
(targets/ascend/shapes.py)."""
HBM_SOURCE = "Huawei Atlas 800I A2 inference server specifications: 8 x Ascend 910B NPU, 64 GB HBM each"


def hbm_bytes(soc_version: str) -> int | None:
    """One NPU's HBM in bytes, or None where no sourced figure is held (HBM_GB)."""
    validate_soc(soc_version)
    gb = HBM_GB.get(soc_version)
    return None if gb is None else gb * 10**9


def validate_soc(soc_version: str) -> str:
    """The soc_version itself, or an error listing every valid value by family."""
    if soc_version in ALL_SOCS:
        return soc_version
    lines = "; ".join(f"{fam}: {', '.join(s)}" for fam, s in SOC_VERSIONS.items())
    raise AscendProfileError(f"unknown soc_version {soc_version!r}: valid values are {lines}")


def soc_family(soc_version: str) -> str:
    validate_soc(soc_version)
    return next(f for f, socs in SOC_VERSIONS.items() if soc_version in socs)


def validate_precision(precision_mode: str, soc_version: str) -> str:
    if precision_mode not in PRECISION_MODES:
        v1 = [m for m, (f, _, _) in PRECISION_MODES.items() if f == "--precision_mode"]
        v2 = [m for m, (f, _, _) in PRECISION_MODES.items() if f == "--precision_mode_v2"]
        raise AscendProfileError(f"unknown precision mode {precision_mode!r}: --precision_mode takes "
                                 f"{', '.join(v1)}; --precision_mode_v2 takes {', '.join(v2)}")
    if precision_mode in BF16_MODES and soc_family(soc_version) not in BF16_SOC_FAMILIES:
        raise AscendProfileError(f"precision mode {precision_mode!r} needs bf16, which {soc_version} "
                                 f"({soc_family(soc_version)}) does not have; bf16 exists on "
                                 f"{', '.join(BF16_SOC_FAMILIES)}")
    return precision_mode


def validate_quant(quant: str, precision_mode: str) -> str:
    if quant not in QUANT_SCHEMES:
        raise AscendProfileError(f"--quant {quant}: target 'ascend' supports {', '.join(QUANT_SCHEMES)} "
                                 "(no FP8 on Ascend 910B/910C; W8A8 is how DeepSeek is served there)")
    if quant != "none" and precision_mode in HIGH_PRECISION_MODES:
        raise AscendProfileError(f"--quant {quant} with precision mode {precision_mode!r}: quantized models take no "
                                 "high-precision mode; use mixed_float16, fp16 or force_fp16")
    return quant


@dataclasses.dataclass(frozen=True)
class AscendProfile:
    """The ascend target's acceptance rules for one soc_version and precision mode."""

    soc_version: str = DEFAULT_SOC
    precision_mode: str = DEFAULT_PRECISION
    opset_range: tuple[int, int] = OPSET_RANGE
    target_opset: int = TARGET_OPSET
    allowed_ops: frozenset = ALLOWED_OPS
    cast_targets: frozenset = CAST_TARGETS
    einsum_equations: frozenset = EINSUM_EQUATIONS
    quant: str = "none"

    def __post_init__(self):
        validate_soc(self.soc_version)
        validate_precision(self.precision_mode, self.soc_version)
        validate_quant(self.quant, self.precision_mode)
        if not (self.opset_range[0] <= self.target_opset <= self.opset_range[1]):
            raise AscendProfileError(f"target opset {self.target_opset} outside {self.opset_range}")

    @property
    def precision_flag(self) -> str:
        return PRECISION_MODES[self.precision_mode][0]

    @property
    def fp32_cube_ok(self) -> bool:
        """fp32 MatMul/Gemm accepted (ATC computes them in fp16/bf16 under this precision mode)."""
        return PRECISION_MODES[self.precision_mode][1]

    @property
    def uses_keep_dtype(self) -> bool:
        """--keep_dtype is passed: the mode lowers precision and ATC honours keep_dtype in it."""
        return PRECISION_MODES[self.precision_mode][2]

    @property
    def mixed(self) -> bool:
        return self.precision_mode in MIXED_MODES

    @property
    def qdq(self) -> bool:
        """QuantizeLinear / DequantizeLinear accepted (a w8a8 profile)."""
        return self.quant == "w8a8"

    def describe(self) -> str:
        return (f"ascend {self.soc_version}, {self.precision_flag}={self.precision_mode}, ONNX opset "
                f"{self.opset_range[0]}..{self.opset_range[1]}, static shapes"
                + (f", {self.quant} QDQ" if self.quant != "none" else ""))


def make_profile(soc_version: str = DEFAULT_SOC, precision_mode: str = DEFAULT_PRECISION,
                 quant: str = "none") -> AscendProfile:
    return AscendProfile(soc_version=soc_version, precision_mode=precision_mode, quant=quant)


# The compiler-facing declaration (targets.base.TargetProfile), for targets.PROFILES.
PROFILE = TargetProfile(
    name="ascend",
    description="Huawei Ascend NPU via CANN ATC (ONNX opset 18, static shapes -> .om); fp16 numerics "
                "emulated on ORT CPU; --quant w8a8 as QDQ (AMCT/ATC acceptance unverified)",
    opset=OPSET_RANGE,
    passes=(),  # the static export writes the absorbed MLA + static MoE forms directly
    quant_schemes=QUANT_SCHEMES,
    dynamic_shapes=False,
    providers=("CPUExecutionProvider",),
    parity_stage="ascend-fp16-emulation",
    runtime_here=False,
)
