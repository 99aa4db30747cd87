"""--budget: sensitivity curves, their cache, the greedy allocation, and budgets met on real runs."""

from __future__ import annotations

import pytest

from rewriter import rewrite, sensitivity
from rewriter.budget import allocate, check_budget
from rewriter.errors import UsageError
from tests.helpers import SAMPLES, first_samples

CALIB = SAMPLES / "digits_calib.npz"
MLP = SAMPLES / "digits_mlp.onnx"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sensitivity"


def _curve(units: dict[str, list[tuple[float, float, int]]], touches=None, macs=1000) -> dict:
    """A pass's curves from (level, drop, MACs after) per unit."""
    points = {u: [{"level": lv, "drop": d, "rel_l2": d, "macs": m, "params": m, "bytes": m} for lv, d, m in pts]
              for u, pts in units.items()}
    base = {"drop": 0.0, "rel_l2": 0.0, "macs": macs, "params": macs, "bytes": macs}
    return {"units": points, "touches": touches or {u: [u] for u in units}, "base": base}


def test_allocation_takes_the_cheapest_cuts_per_saving():
    curves = {"p": _curve({"robust": [(0.5, 0.01, 700), (0.75, 0.02, 550)],
                           "fragile": [(0.5, 0.30, 700), (0.75, 0.60, 550)]})}
    allocation, path = allocate(curves, {"macs": 400})
    assert allocation == {"p": {"robust": 0.75}}
    assert path[-1]["saved"]["macs"] == 450 and path[-1]["estimated_drop"] == pytest.approx(0.02)
    allocation, _ = allocate(curves, {"macs": 600})  # more than the robust unit can give
    assert allocation == {"p": {"robust": 0.75, "fragile": 0.5}}


def test_allocation_spreads_over_light_cuts_rather_than_one_deep_one():
    """Errors of separate cuts add as energies (squared relative L2), so three light cuts with half the error of
    one deep cut each are cheaper for the same saving (ddddocr's recogniser: one deep cut of a 48-channel
    group, worst channel cosine 0.50, where light cuts over 11 groups kept 0.83)."""
    curves = {"p": _curve({"deep": [(0.75, 0.50, 700)], "a": [(0.5, 0.25, 900)], "b": [(0.5, 0.25, 900)],
                           "c": [(0.5, 0.25, 900)]})}
    allocation, path = allocate(curves, {"macs": 300})
    assert allocation == {"p": {"a": 0.5, "b": 0.5, "c": 0.5}}
    assert path[-1]["saved"]["macs"] == 300


def test_allocation_never_cuts_one_layer_with_two_passes():
    curves = {"prune": _curve({"g": [(0.5, 0.01, 600)]}, touches={"g": ["conv1", "conv2"]}),
              "svd": _curve({"conv2": [(0.5, 0.001, 700)], "conv3": [(0.5, 0.05, 700)]})}
    allocation, _ = allocate(curves, {"macs": 600})
    assert allocation == {"svd": {"conv2": 0.5, "conv3": 0.5}}  # conv2 split first, so g (touching it) is out
    allocation, _ = allocate(curves, {"macs": 300})
    assert "g" not in allocation.get("prune", {})


def test_budget_values_are_checked():
    assert check_budget({"macs": 0.5, "size": 0.2}) == {"macs": 0.5, "size": 0.2}
    for bad, match in (({"latency": 5.0}, "latency is not supported"), ({"flops": 0.5}, "not flops"),
                       ({"macs": 1.5}, r"in \(0, 1\]"), ({"macs": True}, "must map")):
        with pytest.raises(UsageError, match=match):
            check_budget(bad)


def test_params_budget_is_met_and_second_run_reuses_the_curves(cache, monkeypatch):
    first = rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.5})
    budget = first.report["budget"]
    assert budget["met"] and budget["achieved"]["params"] <= 0.5
    assert budget["method"] == "sensitivity" and not budget["sensitivity"]["svd"]["cached"]
    assert len(list(cache.glob("svd-*.json"))) == 1

    def no_trials(*args, **kwargs):
        raise AssertionError("sensitivity work redone on a cached model")

    monkeypatch.setattr(sensitivity, "_trial", no_trials)
    second = rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.5})
    assert second.report["budget"]["sensitivity"]["svd"]["cached"]
    assert second.report["budget"]["allocation"] == budget["allocation"]
    with pytest.raises(AssertionError, match="redone"):  # other options are other curves
        rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.5}, options={"svd": {"min_rank": 2}})
    with pytest.raises(AssertionError, match="redone"):  # outputs read otherwise: drops mean something else
        rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.5}, output_axes={"logits": "1:features"})


def test_unreachable_budget_names_what_is_left(cache):
    with pytest.raises(UsageError, match="cannot reach --budget macs=0.01: .* keeps 0.[0-9]+ of its macs"):
        rewrite(MLP, passes=["svd"], calib=CALIB, budget={"macs": 0.01})


@pytest.mark.slow
def test_prune_svd_budget_beats_uniform_prune_at_the_same_macs(cache):
    """The acceptance case: per-unit settings from the curves lose less than one ratio for every group.
    300 held-out digits, so that one digit is a third of a point."""
    from rewriter.canonical import canonicalize
    from rewriter.loading import load_model
    from rewriter.passes.prune import PrunePass

    resnet = SAMPLES / "digits_resnet.onnx"
    spent = rewrite(resnet, passes=["prune", "svd"], calib=CALIB, budget={"macs": 0.5}, holdout=0.5).report
    assert spent["budget"]["met"] and spent["output"]["macs"] <= 0.5 * spent["input"]["macs"]
    assert spent["budget"]["allocation"]["prune"] and spent["budget"]["allocation"]["svd"]
    share = spent["output"]["macs"] / spent["input"]["macs"]
    ratio = PrunePass().uniform_ratio(canonicalize(load_model(resnet), {"input": [1, 1, 8, 8]}), share)
    uniform = rewrite(resnet, passes=["prune"], calib=CALIB, options={"prune": {"ratio": ratio, "max_error": 0}},
                     holdout=0.5).report  # max_error=0: the uniform cut at the same MACs, unbounded
    assert abs(uniform["output"]["macs"] / uniform["input"]["macs"] - share) < 0.01
    ours, theirs = spent["fidelity"], uniform["fidelity"]
    assert ours["accuracy_after"] > theirs["accuracy_after"]  # measured 99.0 % against 98.7 % (99.7 % before)
    assert ours["cosine"] > theirs["cosine"] and ours["channel_cosine_min"] > theirs["channel_cosine_min"]


def test_budget_beyond_max_drop_exits_4_naming_the_closest(cache):
    from rewriter.errors import GuardrailError

    with pytest.raises(GuardrailError, match=r"--max-drop 1e-06.*closest within --max-drop by the sensitivity curves: "
                                             r"params≈0\.\d+|no cut the sensitivity curves list stays within"):
        rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.3}, max_drop=1e-6)


def test_a_result_far_worse_than_its_curves_is_checked_against_one_uniform_setting(cache, monkeypatch):
    from rewriter import budget

    monkeypatch.setattr(budget, "SUSPECT_MARGIN", -1.0)  # every result counts as suspect
    calib = first_samples(CALIB, 96)  # the mechanism is under test, not the figures: fewer samples
    report = rewrite(SAMPLES / "digits_resnet.onnx", passes=["svd"], calib=calib, budget={"macs": 0.5}).report
    spent = report["budget"]
    assert spent["met"] and spent["chosen"] in ("per unit", "uniform")
    drops = spent["probe_drops"]  # both results judged on the probe samples, not on the held-out ones reported
    assert (spent["chosen"] == "uniform") == (drops["uniform"] < drops["per unit"])
    if spent["chosen"] == "uniform":
        assert report["passes"][0]["notes"]["rank_ratio"] != "per layer (--budget)"
    else:
        assert report["passes"][0]["notes"]["rank_ratio"] == "per layer (--budget)"


def test_curves_are_measured_on_fit_samples_never_on_the_held_out_ones(cache, monkeypatch):
    """Cuts chosen by the held-out figures would make the reported fidelity a selected, optimistic one."""
    import numpy as np
    import onnx

    from rewriter.calib import load_calibration, split

    probes = []
    trial = sensitivity._trial

    def spy(rewrite_, model, ctx, probe, *args):
        probes.append((ctx.fit.inputs["input"], probe.held.inputs["input"]))
        return trial(rewrite_, model, ctx, probe, *args)

    monkeypatch.setattr(sensitivity, "_trial", spy)
    rewrite(MLP, passes=["svd"], calib=CALIB, budget={"params": 0.5})
    fit, held = split(load_calibration(CALIB, onnx.load(MLP)), 0.25, 0)
    rows = {row.tobytes() for row in fit.inputs["input"]}
    held_rows = {row.tobytes() for row in held.inputs["input"]}
    assert probes
    for trial_fit, probed in probes:
        probed_rows = {row.tobytes() for row in probed}
        assert len(probed_rows) == sensitivity.PROBE_SAMPLES and probed_rows <= rows
        assert not probed_rows & held_rows
        assert not probed_rows & {row.tobytes() for row in trial_fit}  # out of sample for the trial fits
        assert len(trial_fit) == sensitivity.TRIAL_SAMPLES
    assert np.array_equal(probes[0][1], probes[-1][1])


def test_distill_runs_once_on_the_budgets_result_not_in_every_round(cache, monkeypatch):
    """distill keeps the graph (no count changes), so the rounds and the uniform cross-check run without it and
    it runs once, on the model the budget kept."""
    from rewriter import budget
    from rewriter.metrics import count_macs
    from rewriter.pass_api import PassResult
    from rewriter.passes.distill import DistillPass

    seen = []

    def run(self, model, ctx):
        seen.append(count_macs(model))
        return PassResult(model, [], {"kept": "stub"})

    monkeypatch.setattr(DistillPass, "run", run)
    monkeypatch.setattr(budget, "SUSPECT_MARGIN", -1.0)  # the uniform cross-check runs as well
    calib = first_samples(CALIB, 96)
    result = rewrite(SAMPLES / "digits_resnet.onnx", passes=["svd", "distill"], calib=calib, budget={"macs": 0.5})
    assert "probe_drops" in result.report["budget"]  # both the per-unit and the uniform cuts were made
    assert [p["name"] for p in result.report["passes"]] == ["svd", "distill"]
    assert seen == [result.report["output"]["macs"]]  # once, on what was kept
    assert result.report["budget"]["met"]
