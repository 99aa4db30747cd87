"""targets: rule-based CPU schedules (blocked conv layout, register-tiled conv, reductions) against onnxruntime."""

from __future__ import annotations

import sys
import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rewriter.targets.schedules import _blockable, pick_block
from tests.helpers import SAMPLES, make_model, run_ort, value

tvm = pytest.importorskip("tvm")


def _init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(zlib.crc32(prefix.encode()))
    arrays = [rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels) * 0.1,
              rng.standard_normal(channels) * 0.1, rng.uniform(0.5, 1.5, channels)]
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{k}")
            for a, k in zip(arrays, ("scale", "bias", "mean", "var"), strict=True)]


def conv_zoo() -> onnx.ModelProto:
    """The layer kinds of YOLOv8n, MobileNetV3 and DBNet at small sizes, each with its epilogue."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]),  # RGB stem, strided
        node("Sigmoid", ["c0"], ["s0"]), node("Mul", ["c0", "s0"], ["a"]),  # SiLU
        node("Split", ["a", "split"], ["a1", "a2"], axis=1),  # C2f split into half blocks
        node("Conv", ["a2", "w1", "b1"], ["c1"]),  # 1x1
        node("Concat", ["a1", "c1"], ["cat"], axis=1),
        node("Conv", ["cat", "w2"], ["c2"]),
        node("BatchNormalization", ["c2", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n2"]),
        node("Relu", ["n2"], ["d"]),
        node("Conv", ["d", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], group=32),  # depthwise
        node("HardSwish", ["c3"], ["e"]),
        node("Conv", ["e", "w4", "b4"], ["c4"], pads=[2, 2, 2, 2], dilations=[2, 2]),  # dilated
        node("Add", ["c4", "e"], ["f"]),  # residual
        node("Conv", ["f", "w5", "b5"], ["g"], pads=[1, 1, 1, 1], group=4),  # grouped
        node("Conv", ["g", "w6", "b6"], ["h"]),  # 12 output channels: no whole block
        node("ConvTranspose", ["h", "w7", "b7"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Sigmoid", ["t"], ["ts"]),
        node("MaxPool", ["ts"], ["pool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("GlobalAveragePool", ["f"], ["gap"]), node("Flatten", ["gap"], ["flat"]),
        node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1),
    ]
    inits = [
        _init("w0", (16, 3, 3, 3)), _init("b0", (16,)), numpy_helper.from_array(np.array([8, 8]), "split"),
        _init("w1", (8, 8, 1, 1)), _init("b1", (8,)), _init("w2", (32, 16, 1, 1)), *_bn("bn", 32),
        _init("w3", (32, 1, 3, 3)), _init("b3", (32,)), _init("w4", (32, 32, 3, 3), 0.1), _init("b4", (32,)),
        _init("w5", (32, 8, 3, 3), 0.1), _init("b5", (32,)), _init("w6", (12, 32, 1, 1)), _init("b6", (12,)),
        _init("w7", (12, 8, 2, 2)), _init("b7", (8,)), _init("wg", (5, 32)), _init("bg", (5,)),
    ]
    outputs = [value("pool", [1, 8, 16, 16]), value("logits", [1, 5])]
    return make_model(nodes, [value("x", [1, 3, 16, 16])], outputs, inits)


def transposed_convs() -> onnx.ModelProto:
    """ConvTranspose with overlapping taps, padding and output padding (DBNet-style heads and others)."""
    node = helper.make_node
    nodes = [
        node("ConvTranspose", ["x", "w0", "b0"], ["t0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             output_padding=[1, 1]),
        node("Relu", ["t0"], ["r0"]),
        node("ConvTranspose", ["r0", "w1"], ["y"], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    inits = [_init("w0", (8, 16, 3, 3)), _init("b0", (16,)), _init("w1", (16, 4, 4, 4))]
    return make_model(nodes, [value("x", [1, 8, 5, 7])], [value("y", [1, 4, 20, 28])], inits)


def upsampling_head() -> onnx.ModelProto:
    """DBNet's head: transposed convs whose stride equals their kernel (each output pixel reads one input pixel)."""
    node = helper.make_node
    nodes = [
        node("ConvTranspose", ["x", "w0", "b0"], ["t0"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Relu", ["t0"], ["r0"]),
        node("ConvTranspose", ["r0", "w1", "b1"], ["t1"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Sigmoid", ["t1"], ["y"]),
    ]
    inits = [_init("w0", (16, 16, 2, 2)), _init("b0", (16,)), _init("w1", (16, 1, 2, 2)), _init("b1", (1,))]
    return make_model(nodes, [value("x", [1, 16, 6, 10])], [value("y", [1, 1, 24, 40])], inits)


def distribution_focal_head() -> onnx.ModelProto:
    """YOLOv8's DFL decoding: box logits [1, 64, A] -> [1, 4, 16, A] -> softmax over the 16 bins on axis 1 of
    [1, 16, 4, A] -> expected bin by a 1x1 conv."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"]),
        node("Reshape", ["c0", "shape"], ["r0"]),
        node("Transpose", ["r0"], ["t0"], perm=[0, 2, 1, 3]),
        node("Softmax", ["t0"], ["s0"], axis=1),
        node("Conv", ["s0", "bins"], ["y"]),
    ]
    inits = [_init("w0", (64, 16, 1, 1), 1.0), _init("b0", (64,)),
             numpy_helper.from_array(np.array([1, 4, 16, 40], np.int64), "shape"),
             numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "bins")]
    return make_model(nodes, [value("x", [1, 16, 40, 1])], [value("y", [1, 1, 4, 40])], inits)


def clip_activations() -> onnx.ModelProto:
    """PP-OCR (DBNet, PPLCNet) and MobileNetV3 activations between blocked convs: Clip with constant bounds
    (opset 13 inputs), HardSwish, HardSigmoid, and per-tensor affine constants of shape (1,)."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        node("Mul", ["c0", "scale"], ["m0"]), node("Add", ["m0", "shift"], ["a0"]),  # learnable affine block
        node("Clip", ["a0", "lo", "hi"], ["r0"]),  # ReLU6
        node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        node("HardSwish", ["c1"], ["h1"]),
        node("Conv", ["h1", "w2", "b2"], ["c2"]),
        node("HardSigmoid", ["c2"], ["g2"], alpha=0.2, beta=0.5),
        node("Mul", ["g2", "c2"], ["y"]),
    ]
    scalar = lambda v, name, shape=(): numpy_helper.from_array(np.full(shape, v, np.float32), name)  # noqa: E731
    inits = [_init("w0", (16, 16, 3, 3), 0.2), _init("b0", (16,)), scalar(1.3, "scale", (1,)),
             scalar(-0.2, "shift", (1,)), scalar(0.0, "lo"), scalar(6.0, "hi"),
             _init("w1", (16, 16, 3, 3), 0.2), _init("b1", (16,)), _init("w2", (16, 16, 1, 1)), _init("b2", (16,))]
    return make_model(nodes, [value("x", [1, 16, 12, 12])], [value("y", [1, 16, 12, 12])], inits)


def test_clip_activations_keep_the_blocked_layout_and_match_onnxruntime():
    model = clip_activations()
    scheduled, target = _lower(model)
    main = scheduled["main"].script(show_meta=False)
    # the input into blocks and the output back: nothing in between leaves the blocked layout
    assert main.count("layout_transform") == 2, main
    _check_against_onnxruntime(model, scheduled, target)


def fpn_neck(mode: str, transform: str) -> onnx.ModelProto:
    """An FPN step (DBNet, YOLO necks): a strided map upsampled by Resize and concatenated on the channel axis."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]), node("Relu", ["c0"], ["r0"]),
        node("Resize", ["r0", "", "scales"], ["up"], mode=mode, coordinate_transformation_mode=transform),
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        node("Concat", ["up", "c1"], ["cat"], axis=1),
        node("Conv", ["cat", "w2", "b2"], ["y"]),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    inits = [_init("w0", (16, 16, 3, 3), 0.2), _init("b0", (16,)), _init("w1", (16, 16, 3, 3), 0.2),
             _init("b1", (16,)), _init("w2", (16, 32, 1, 1)), _init("b2", (16,)), scales]
    return make_model(nodes, [value("x", [1, 16, 16, 16])], [value("y", [1, 16, 16, 16])], inits)


@pytest.mark.parametrize(("mode", "transform"), [("nearest", "asymmetric"), ("linear", "half_pixel")])
def test_resize_and_concat_keep_the_blocked_layout_and_match_onnxruntime(mode, transform):
    model = fpn_neck(mode, transform)
    scheduled, target = _lower(model)
    main = scheduled["main"].script(show_meta=False)
    assert main.count("layout_transform") == 2, main  # into blocks at the input, back at the output
    _check_against_onnxruntime(model, scheduled, target)


def c2f_block() -> onnx.ModelProto:
    """YOLOv8's C2f: a conv split in two whole-block halves (Split, and a Slice with an end past the channels),
    a bottleneck on the second half, all three concatenated on the channel axis."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"]), node("Sigmoid", ["c0"], ["s0"]), node("Mul", ["c0", "s0"], ["a"]),
        node("Split", ["a", "split"], ["a1", "a2"], axis=1),
        node("Slice", ["a", "starts", "ends", "axes"], ["a3"]),  # the second half again, end clipped
        node("Conv", ["a2", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
        node("Add", ["r1", "a3"], ["res"]),
        node("Concat", ["a1", "a2", "res"], ["cat"], axis=1),
        node("Conv", ["cat", "w2", "b2"], ["y"]),
    ]
    ints = lambda v, name: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [_init("w0", (32, 16, 1, 1)), _init("b0", (32,)), ints([16, 16], "split"), ints([16], "starts"),
             ints([2**62], "ends"), ints([1], "axes"), _init("w1", (16, 16, 3, 3), 0.2), _init("b1", (16,)),
             _init("w2", (16, 48, 1, 1)), _init("b2", (16,))]
    return make_model(nodes, [value("x", [1, 16, 12, 12])], [value("y", [1, 16, 12, 12])], inits)


def test_channel_splits_and_slices_of_whole_blocks_keep_the_blocked_layout_and_match_onnxruntime():
    model = c2f_block()
    scheduled, target = _lower(model)
    main = scheduled["main"].script(show_meta=False)
    assert main.count("layout_transform") == 2, main  # into blocks at the input, back at the output
    _check_against_onnxruntime(model, scheduled, target)


def matrix_products() -> onnx.ModelProto:
    """A recogniser's head: a per-step projection (batched MatMul, whole tiles), a classifier Gemm whose 300 classes
    are no whole tile (padded), and a one-row product as in a recurrent step."""
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["p"]), node("Add", ["p", "b1"], ["q"]), node("Relu", ["q"], ["h"]),
        node("Reshape", ["h", "rows"], ["flat"]),
        node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1),
        node("ReduceMean", ["h"], ["step"], axes=[1], keepdims=0),
        node("MatMul", ["step", "w3"], ["state"]),
    ]
    inits = [_init("w1", (64, 128), 0.1), _init("b1", (128,)), numpy_helper.from_array(np.array([20, 128]), "rows"),
             _init("w2", (300, 128), 0.1), _init("b2", (300,)), _init("w3", (128, 256), 0.1)]
    return make_model(nodes, [value("x", [1, 20, 64])], [value("logits", [20, 300]), value("state", [1, 256])],
                      inits, opset=17)


def test_matrix_products_are_register_tiled_with_padded_columns_and_match_onnxruntime():
    model = matrix_products()
    scheduled, target = _lower(model)
    products = {gv.name_hint: f.script() for gv, f in scheduled.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert len(products) == 3, sorted(products)
    assert any("strided_slice" in name for name in products), sorted(products)  # the 300 classes, padded to 320
    for name, text in products.items():  # each accumulates in a local register tile written back once
        assert 'scope="local"' in text and "T.vectorized" in text, name
    _check_against_onnxruntime(model, scheduled, target)


def _lower(model: onnx.ModelProto):
    """Import, fuse and schedule the way build_artifact does for the x86 preset; (module, target)."""
    from rewriter.targets.lower import fuse_pipeline, import_onnx, schedule_pipeline
    from rewriter.targets.presets import make_tvm_target, resolve_target

    target = make_tvm_target(resolve_target("x86"))
    with target:
        fused = fuse_pipeline()(import_onnx(model))
        return schedule_pipeline(target)(fused), target


def _run(scheduled, target, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from tvm import relax

    with target:
        executable = tvm.compile(scheduled, target=target, relax_pipeline="default_build")
    device = tvm.cpu()
    out = relax.VirtualMachine(executable, device)["main"](*[tvm.runtime.tensor(x, device) for x in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _kernels(scheduled) -> dict[str, bool]:
    return {gv.name_hint: bool(f.attrs is not None and f.attrs.get("tirx.is_scheduled", False))
            for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _assert_close_relative(outputs: list[np.ndarray], reference: list[np.ndarray], rtol: float = 1e-4) -> None:
    for out, ref in zip(outputs, reference, strict=True):
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def zoo():
    model = conv_zoo()
    return model, *_lower(model)


def _check_against_onnxruntime(model, scheduled, target) -> None:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    kernels = _kernels(scheduled)
    assert all(kernels.values()), [name for name, done in kernels.items() if not done]
    _assert_close_relative(_run(scheduled, target, [x]), run_ort(model, {"x": x}))


def test_conv_zoo_matches_onnxruntime_with_every_kernel_scheduled(zoo):
    _check_against_onnxruntime(*zoo)


def test_transposed_convs_match_onnxruntime():
    model = transposed_convs()
    scheduled, target = _lower(model)
    assert any("conv2d_transpose" in name for name in _kernels(scheduled))
    _check_against_onnxruntime(model, scheduled, target)


def test_stride_equal_kernel_transposed_convs_become_1x1_convs_and_match_onnxruntime():
    model = upsampling_head()
    scheduled, target = _lower(model)
    names = " ".join(_kernels(scheduled))
    assert "conv2d_transpose" not in names and "conv2d_nchwc" in names, names  # a blocked 1x1 conv
    _check_against_onnxruntime(model, scheduled, target)


def test_softmax_across_channels_is_split_into_streaming_kernels_and_matches_onnxruntime():
    model = distribution_focal_head()
    scheduled, target = _lower(model)
    names = " ".join(_kernels(scheduled))
    assert "softmax_max" in names and "softmax_sum" in names, names
    _check_against_onnxruntime(model, scheduled, target)


def test_blocked_layout_reaches_regular_depthwise_and_transposed_convs(zoo):
    _, scheduled, _ = zoo
    names = " ".join(_kernels(scheduled))
    assert names.count("dwconv2d_nchwc") == 1  # the depthwise conv
    # With 16-channel blocks: the RGB stem, the 16->32 1x1, the dilated 3x3 and the 2x2-stride-2 transposed
    # conv (a 1x1 conv to 4x the channels, then a pixel shuffle). The 8->8 1x1, the grouped conv and the
    # 12-channel conv stay NCHW (their channels are not whole blocks).
    assert names.replace("dwconv2d_nchwc", "").count("conv2d_nchwc") == 4
    assert "conv2d_transpose" not in names


def test_convs_left_in_nchw_vectorise_their_output_columns(zoo):
    """The NCHW convs (channels not whole blocks) with a bias epilogue take the vectorised inner-reduction
    schedule, not dlight's reduction rule, which computes them one output at a time (5-10x slower)."""
    from tvm import s_tir, tirx

    _, scheduled, _ = zoo
    found = 0
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "nchwc" in gvar.name_hint or "conv2d" not in gvar.name_hint:
            continue
        sch = s_tir.Schedule(func)
        name = "group_conv2d_nchw" if "group_conv2d" in func.script() else "conv2d_nchw"
        innermost = sch.get(sch.get_loops(sch.get_sblock(f"{name}_update"))[-1])
        assert innermost.kind == tirx.ForKind.VECTORIZED, gvar.name_hint
        found += 1
    assert found == 3  # the 8->8 1x1, the grouped conv and the 12-channel conv, each with a bias


def test_activation_after_batch_normalization_fuses_into_the_conv_kernel(zoo):
    # A legalised BatchNormalization is a tuple read back by index: fusion stopped there, and the Relu after it
    # ran as a kernel of its own until the bindings were canonicalised before fusion.
    names = _kernels(zoo[1])
    assert "fused_conv2d_nchwc1_subtract_divide_multiply1_add2_relu" in names, sorted(names)
    assert not any(name.removeprefix("fused_").startswith("relu") for name in names), sorted(names)


def test_weights_are_repacked_at_compile_time(zoo):
    """No kernel repacks a weight at run time: every weight layout_transform was folded to a constant."""
    _, scheduled, _ = zoo
    packs = [gv.name_hint for gv, f in scheduled.functions_items()
             if "layout_transform" in gv.name_hint and len(f.params[-1].shape) == 6]  # OIHW -> blocked weights
    main = scheduled["main"].script(show_meta=False).splitlines()
    assert not [line for line in main if any(name + "," in line for name in packs)]
    assert not [line for line in main if "layout_transform" in line and "metadata[" in line]


def test_pick_block_covers_most_macs_and_prefers_wide_blocks():
    convs = [(64, 64, 1, 1000), (72, 72, 72, 10), (3, 16, 1, 50)]
    assert pick_block(convs, 16) == 16
    mobilenet_like = [(72, 72, 72, 1000), (24, 72, 1, 1000), (72, 24, 1, 1000), (16, 16, 1, 10)]
    assert pick_block(mobilenet_like, 16) == 8
    assert pick_block([(5, 7, 1, 100)], 16) is None
    assert pick_block(convs, 8) == 8
    # YOLOX-style: a 16-block leaves the 24-channel layers (10 % of the MACs) in NCHW, which costs more than running
    # every layer in 8-blocks
    yolox_like = [(48, 96, 1, 540), (96, 96, 1, 361), (24, 48, 1, 63), (12, 24, 1, 36)]
    assert pick_block(yolox_like, 16) == 8


def test_blockable_rules():
    assert _blockable(3, 16, 1, 16)  # RGB stem: one input block
    assert not _blockable(24, 32, 1, 16)  # 24 input channels cannot be whole 16-blocks
    assert _blockable(32, 32, 32, 16)  # depthwise
    assert not _blockable(32, 32, 4, 16)  # grouped stays NCHW
    assert not _blockable(32, 12, 1, 16)


@pytest.fixture(scope="module")
def real():
    sys.path.insert(0, str(SAMPLES))
    from fetch_real_models import build_calibration, default_cache, fetch_models

    cache = default_cache()
    return fetch_models(cache), build_calibration(cache)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n"])
def test_real_model_untuned_build_matches_onnxruntime(real, name):
    from rewriter.canonical import canonicalize

    models, calibs = real
    original = onnx.load(str(models[name]))
    input_name = original.graph.input[0].name
    with np.load(calibs[name]) as data:
        x = np.ascontiguousarray(data[input_name][:1], np.float32)
    model = canonicalize(original, {input_name: list(x.shape)})
    scheduled, target = _lower(model)
    kernels = _kernels(scheduled)
    assert all(kernels.values())
    assert sum("conv2d_nchwc" in n for n in kernels) >= 10
    _assert_close_relative(_run(scheduled, target, [x]), run_ort(model, {input_name: x}))


def test_trials_follow_mac_share_at_most_64_a_task_and_skip_kernels_without_macs():
    from rewriter.targets.tuning_seed import allocate_trials

    assert allocate_trials([600, 300, 100, 0], 10) == [6, 3, 1, 0]
    assert sum(allocate_trials([5, 5, 5], 64)) == 64
    assert allocate_trials([0, 0], 8) == [0, 0]
    # no task past 64 trials however large its share: the excess goes to the others by their shares
    assert allocate_trials([900, 50, 50], 100) == [64, 18, 18]
    assert allocate_trials([1000, 10, 10, 10], 200) == [64, 46, 45, 45]
    assert allocate_trials([100, 100, 0], 500) == [64, 64, 0]  # all at the cap: the rest is not spent


def test_block_macs_counts_reduction_blocks_only():
    from tvm import te, topi

    from rewriter.targets.conv_compute import conv2d_nchwc
    from rewriter.targets.tuning_seed import block_macs

    data = te.placeholder((1, 2, 6, 6, 8), name="x")
    kernel = te.placeholder((2, 2, 3, 3, 8, 8), name="w")
    out = topi.nn.relu(conv2d_nchwc(data, kernel, [1, 1], [1, 1, 1, 1], [1, 1]))
    # 1 x 16 output channels x 6 x 6 pixels x (16 input channels x 3 x 3); the pad and relu add none
    assert block_macs(te.create_prim_func([data, kernel, out])) == 16 * 36 * 16 * 9
