"""The prune pass: exact removal of dead channels through every coupling, the digits samples, baselines, options."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter import rewrite
from rewriter.calib import Calibration
from rewriter.errors import UsageError
from rewriter.metrics import count_macs
from rewriter.pass_api import PassContext
from rewriter.passes._prune_fit import lasso_select, reconstruction_error
from rewriter.passes.prune import PrunePass
from rewriter.pipeline import checked
from tests.channel_nets import Net
from tests.helpers import CALIB, SAMPLES, run_ort, save_npz, token_mlp_model


def _context(n: int = 24, seed: int = 0) -> PassContext:
    x = np.random.default_rng(seed).normal(size=(n, 4, 6, 6)).astype(np.float32)
    return PassContext(fit=Calibration({"x": x}, None, "test"))


def _residual(n: Net) -> tuple[str, int]:
    a = n.op("Relu", [n.conv("x", 4, 8, "a")], "ra")
    b = n.conv(n.op("Relu", [n.conv(a, 8, 8, "b1")], "rb"), 8, 8, "b2")
    s = n.op("Relu", [n.op("Add", [a, b], "sum")], "rs")
    n.conv(s, 8, 3, "head")
    n.kill("a", [1, 4, 6, 7])
    n.kill("b2", [1, 4, 6, 7])
    n.kill("b1", [0, 2, 3, 5])
    return "head", 3


def _concat_split(n: Net) -> tuple[str, int]:
    p = n.op("Relu", [n.conv("x", 4, 8, "p")], "rp")
    left, right = n.split(p, [4, 4], ["left", "right"])
    q = n.op("Relu", [n.conv(right, 4, 4, "q")], "rq")
    n.conv(n.op("Concat", [left, q, right], "cat", axis=1), 12, 3, "head", k=1)
    n.kill("p", [0, 3, 5, 6])
    n.kill("q", [1, 2])
    return "head", 3


def _squeeze_excite(n: Net) -> tuple[str, int]:
    x = n.op("Relu", [n.conv("x", 4, 8, "main")], "rm")
    squeezed = n.op("Relu", [n.conv(n.op("GlobalAveragePool", [x], "gap"), 8, 4, "reduce", k=1)], "rr")
    gate = n.op("HardSigmoid", [n.conv(squeezed, 4, 8, "expand", k=1)], "gate")
    n.conv(n.op("Mul", [x, gate], "scaled"), 8, 3, "head", k=1)
    n.kill("main", [0, 3, 6, 7])
    n.kill("reduce", [1, 2])
    return "head", 3


def _depthwise(n: Net) -> tuple[str, int]:
    p = n.op("Relu", [n.conv("x", 4, 8, "p", k=1)], "rp")
    d = n.op("Relu", [n.conv(p, 8, 8, "dw", group=8)], "rd")
    n.conv(d, 8, 3, "head", k=1)
    n.kill("p", [2, 3, 5, 6])
    n.kill("dw", [2, 3, 5, 6])
    return "head", 3


@pytest.mark.parametrize("build", [_residual, _concat_split, _squeeze_excite, _depthwise])
@pytest.mark.parametrize(("refit", "sequential"), [(False, False), (True, False), (True, True)])
def test_dead_channels_leave_through_every_coupling_and_nothing_changes(build, refit, sequential):
    n = Net()
    out, c = build(n)
    model = n.model({out: [1, c, 6, 6]})
    result = PrunePass(ratio=0.5, refit=refit, sequential=sequential).run(model, _context())
    new = checked(result.model, "prune")
    assert count_macs(new) < count_macs(model)
    used = {name for node in new.graph.node for name in node.input}
    assert all(t.name in used for t in new.graph.initializer)
    x = np.random.default_rng(7).normal(size=(1, 4, 6, 6)).astype(np.float32)
    expected, got = run_ort(model, {"x": x})[0], run_ort(new, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_lasso_keeps_the_channels_that_carry_the_output():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 6)) * np.array([1.0, 0.05, 2.0, 0.01, 0.5, 0.02])
    y = z.sum(axis=1)
    kept, more = lasso_select(z, y, [3, 5])  # one regularisation path, several counts
    assert kept.tolist() == [0, 2, 4] and len(more) == 5 and set(kept) <= set(more)
    assert reconstruction_error(z, y, kept) < 0.05 < 0.9 < reconstruction_error(z, y, np.array([1, 3, 5]))
    assert reconstruction_error(z, y, np.arange(6)) == 0.0


def test_unprunable_graph_is_left_unchanged():
    n = Net()
    n.conv(n.op("Relu", [n.conv("x", 4, 6, "a")], "ra"), 6, 2, "b")
    model = n.model({"ra": [1, 6, 6, 6], "b": [1, 2, 6, 6]})  # a's channels are a graph output
    result = PrunePass(ratio=0.5).run(model, _context())
    assert result.model is model and result.changed == []
    assert result.notes["unchanged"] == "no prunable channel group"
    assert "graph output" in next(iter(result.notes["groups"].values()))["skipped"]


def _subset(n: int) -> dict[str, np.ndarray]:
    with np.load(CALIB) as data:
        return {k: data[k][:n] for k in data.files}


def _digits(name: str, calib=CALIB, **options):
    return rewrite(SAMPLES / f"digits_{name}.onnx", passes=["prune"], calib=calib, options={"prune": options}).report


@pytest.fixture(scope="module")
def vgg():
    # max_error=0: every group cut at the ratio itself, so that the criteria are compared at the same MACs
    return {(crit, refit): _digits("vgg", ratio=0.5, criterion=crit, refit=refit, max_error=0)
            for crit, refit in [("lasso", True), ("l1", True), ("lasso", False)]}


def test_vgg_half_ratio_halves_macs_within_a_point_of_accuracy(vgg):
    report = vgg["lasso", True]
    assert report["output"]["macs"] <= 0.5 * report["input"]["macs"]
    fid = report["fidelity"]
    assert fid["accuracy_after"] >= fid["accuracy_before"] - 0.01
    groups = report["passes"][0]["notes"]["groups"]
    assert sum("skipped" not in g for g in groups.values()) >= 3
    assert all(g["scoring"].startswith("lasso") for g in groups.values() if "skipped" not in g)


def test_lasso_beats_l1_and_refit_beats_none_at_the_same_ratio(vgg):
    macs = {k: r["output"]["macs"] for k, r in vgg.items()}
    assert len(set(macs.values())) == 1
    error = {k: r["fidelity"]["rel_l2"] for k, r in vgg.items()}
    assert error["lasso", True] < error["l1", True]
    assert error["lasso", True] < 0.5 * error["lasso", False]


def test_max_error_cuts_a_group_only_as_far_as_its_estimated_error_allows(vgg):
    """prune.max_error lowers a group's cut (3/4, 1/2, 1/4 of the ratio, then none) until He et al.'s
    reconstruction of its consumers' outputs from the kept channels stays within it."""
    free = vgg["lasso", True]
    bounded = _digits("vgg", ratio=0.5, max_error=0.1)
    notes = bounded["passes"][0]["notes"]
    assert notes["max_error"] == 0.1 and free["passes"][0]["notes"]["max_error"] is None
    groups = [g for g in notes["groups"].values() if "estimated_error" in g]
    assert groups and all(g["estimated_error"] <= 0.1 for g in groups)
    lowered = [g for g in groups if "bounded" in g]
    assert lowered and all(g["size_after"] > g["bounded"]["kept_instead_of"] for g in lowered)
    assert all(max(g["bounded"]["estimated_errors"].values()) > 0.1 for g in lowered)
    assert not any("bounded" in g for g in free["passes"][0]["notes"]["groups"].values())
    assert free["output"]["macs"] < bounded["output"]["macs"] < bounded["input"]["macs"]
    assert bounded["fidelity"]["rel_l2"] < free["fidelity"]["rel_l2"]


def test_a_bound_no_cut_can_meet_leaves_the_model_unchanged():
    result = rewrite(SAMPLES / "digits_vgg.onnx", passes=["prune"], calib=_subset(160),
                     options={"prune": {"ratio": 0.5, "max_error": 1e-6}})
    record = result.report["passes"][0]
    assert record["changed"] == [] and record["notes"]["unchanged"] == "every cut exceeds prune.max_error"
    assert result.report["output"]["macs"] == result.report["input"]["macs"]
    skipped = [g["skipped"] for g in record["notes"]["groups"].values() if "bounded" in g]
    assert skipped and all("prune.max_error=1e-06" in why for why in skipped)


def test_resnet_residual_stream_pruned_jointly():
    report = _digits("resnet", ratio=0.5, max_error=0)  # the residual stream cut at the ratio itself
    assert report["output"]["macs"] <= 0.6 * report["input"]["macs"]
    fid = report["fidelity"]
    assert fid["accuracy_after"] >= fid["accuracy_before"] - 0.02
    groups = report["passes"][0]["notes"]["groups"].values()
    residual = [g for g in groups if len(g["producers"]) >= 3 and "skipped" not in g]
    assert residual and all(g["size_after"] < g["size_before"] for g in residual)


def test_mobilenet_squeeze_excite_and_depthwise_groups_pruned():
    report = _digits("mobilenet", calib=_subset(240), ratio=0.3)
    groups = report["passes"][0]["notes"]["groups"].values()
    pruned = [g for g in groups if g["size_after"] < g["size_before"]]
    se = [g for g in pruned if any("expand" in p for p in g["producers"])]
    assert se, "a group with a squeeze-excite gate among its producers is pruned"
    assert any(len(g["consumers"]) >= 2 for g in se)  # read by the SE reduce conv and the projection
    assert report["output"]["macs"] < 0.75 * report["input"]["macs"]
    assert report["fidelity"]["top1_agreement"] > 0.8


def test_a_build_target_rounds_kept_channels_to_its_vector_block():
    """With --target x86/arm/cuda kept counts are whole 8-channel blocks (odd counts leave every conv on TVM's slow
    NCHW path); without a target, or with prune.round_to given, the counts are the ratio's own."""
    def sizes(**kwargs):
        report = _digits_run("vgg", calib=_subset(160), **kwargs)
        notes = report["passes"][0]["notes"]
        pruned = [g["size_after"] for g in notes["groups"].values() if g.get("size_after", 0) < g["size_before"]]
        return notes["round_to"], pruned

    multiple, pruned = sizes(target="x86", options={"prune": {"ratio": 0.3}})
    assert multiple == 8 and pruned and all(k % 8 == 0 for k in pruned)
    for kwargs in ({}, {"target": "x86", "options": {"prune": {"ratio": 0.3, "round_to": 1}}}):
        kwargs.setdefault("options", {"prune": {"ratio": 0.3}})
        multiple, pruned = sizes(**kwargs)
        assert multiple == 1 and any(k % 8 for k in pruned)


def _digits_run(name: str, calib, **kwargs) -> dict:
    return rewrite(SAMPLES / f"digits_{name}.onnx", passes=["prune"], calib=calib, **kwargs).report


def test_budget_chooses_a_ratio_per_group(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITER_CACHE", str(tmp_path))
    result = rewrite(SAMPLES / "digits_vgg.onnx", passes=["prune"], calib=_subset(160), budget={"macs": 0.4})
    prune = result.report["passes"][0]
    assert prune["macs_after"] <= 0.4 * prune["macs_before"]
    chosen = result.report["budget"]["allocation"]["prune"]
    groups = prune["notes"]["groups"]
    for key, record in groups.items():  # each group cut as far as its own ratio, the others left whole
        if key in chosen:
            assert record["size_after"] == record["size_before"] - round(chosen[key] * record["size_before"])
        else:
            assert record["size_after"] == record["size_before"]


def test_budget_without_data_takes_one_uniform_ratio():
    result = rewrite(SAMPLES / "digits_vgg.onnx", passes=["prune"], budget={"macs": 0.4},
                     options={"prune": {"criterion": "l1", "refit": False}})
    prune = result.report["passes"][0]
    assert prune["macs_after"] <= 0.4 * prune["macs_before"]
    assert 0.2 < prune["notes"]["ratio"] < 0.5  # half the channels would leave a quarter of the MACs


def test_svd_composes_after_prune():
    result = rewrite(SAMPLES / "digits_vgg.onnx", passes=["prune", "svd"], calib=_subset(80),
                     options={"svd": {"keep_heads": False}})
    prune, svd = result.report["passes"]
    assert prune["changed"] and svd["changed"]
    assert svd["macs_after"] < svd["macs_before"] < prune["macs_before"]


def test_options_are_checked():
    with pytest.raises(ValueError):
        PrunePass(criterion="random")
    with pytest.raises(ValueError):
        PrunePass(ratio=1.0)
    n = Net()
    n.conv(n.op("Relu", [n.conv("x", 4, 6, "a")], "ra"), 6, 2, "b")
    model = n.model({"b": [1, 2, 6, 6]})
    with pytest.raises(UsageError):
        PrunePass(ratio=0.5).run(model, PassContext(fit=None))


def test_blocks_drop_the_cheapest_residual_branch_and_refit_the_next_layer():
    report = _digits("resnet", calib=_subset(240), ratio=0.0, blocks=1)
    notes = report["passes"][0]["notes"]["blocks"]
    costs = notes["output_error"]
    assert len(costs) == 2  # the two identity-shortcut blocks; the projection-shortcut block is no candidate
    assert notes["removed"] == [min(costs, key=costs.get)]
    assert notes["refits"]
    assert report["output"]["macs"] < 0.8 * report["input"]["macs"]
    fid = report["fidelity"]
    assert fid["accuracy_after"] >= fid["accuracy_before"] - 0.02


def test_hidden_units_of_a_token_mlp_behind_reshapes_are_pruned(tmp_path):
    model = token_mlp_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 8)).astype(np.float32)
    calib = save_npz(tmp_path / "tokens.npz", x=x)
    result = rewrite(model, passes=["prune"], calib=calib, options={"prune": {"ratio": 0.5, "max_error": 0}})
    group = next(g for g in result.report["passes"][0]["notes"]["groups"].values() if "fc2" in g["consumers"])
    assert (group["size_before"], group["size_after"]) == (24, 12)
    y = run_ort(result.model, {"x": x[:5]})[0]
    assert y.shape == (5, 6, 8)
    assert result.report["fidelity"]["cosine"] > 0.9
