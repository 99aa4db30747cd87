"""The distill pass's training loop: teacher and student in the PyTorch interpreter, Adam on the student's
float initializers, held-out loss and fidelity every few steps, the state of lowest held-out loss kept."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import torch

from rewriter.calib import Calibration
from rewriter.errors import ModelError
from rewriter.layouts import infer_layouts
from rewriter.pass_api import PassContext

from ._distill_data import augment, join_runs, per_sample, run_graph, run_samples, split_fit, takes_batches
from ._distill_loss import TOP_SHARE, LossSetup, channel_variance, fitted_temperature
from ._torch_graph import TorchGraph, trainable_names
from .distill import fidelity_drop, rewritten_tensors, spread

VAL_CAP = 64  # validation samples at most: enough for a stable figure, cheap to evaluate
STATS_SAMPLES = 32  # samples that set the teacher's per-channel variances
IMPROVEMENT = 1e-5  # a held-out drop at or below this leaves nothing to recover
LOSS_IMPROVEMENT = 1e-6  # the held-out loss (clean inputs: no noise between evaluations) must fall by this share


def _better(new: dict, old: dict) -> bool:
    """A lower loss on the held-out split's clean inputs. Not the drop: on the few dozen samples of the split,
    the worst of hundreds of class channels moves with one character or one box, while the loss averages
    every output and position (a state chosen on the drop could read better there and worse everywhere else)."""
    return new["loss"] < old["loss"] * (1.0 - LOSS_IMPROVEMENT)


def _relative_groups(params: list[torch.nn.Parameter], lr: float) -> list[dict]:
    """Adam moves every value by about lr per step whatever its scale, so each tensor's step is lr times its
    RMS: `lr` is a relative change (a codebook, a binary scale and a bias move alike). Tensors near zero
    (fresh biases) use a floor of the median RMS / 10."""
    rms = [float(p.detach().pow(2).mean().sqrt()) for p in params]
    floor = 0.1 * float(np.median(rms)) + 1e-12
    return [{"params": [p], "lr": lr * max(r, floor)} for p, r in zip(params, rms, strict=True)]


@contextmanager
def torch_settings(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic, with a fixed thread count; the caller's settings come back afterwards."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _chunks(data: Calibration, size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(data), size):
        yield {k: v[start: start + size] for k, v in data.inputs.items()}


class Trainer:
    """One distillation run of `model` (student) against `teacher` on the fit samples `data`."""

    def __init__(self, opts, model: onnx.ModelProto, teacher: onnx.ModelProto, data: Calibration,
                 ctx: PassContext) -> None:
        self.opts, self.model, self.ctx = opts, model, ctx
        self.train, self.val = split_fit(data, opts.holdout, VAL_CAP, ctx.seed)
        self.whole = data.whole  # inputs fed whole per sample: no batching along an axis we cannot name
        self.student = TorchGraph(model, trainable_names(model))
        self.teacher, self.teacher_model = TorchGraph(teacher), teacher
        if self.student.outputs != self.teacher.outputs:
            raise ModelError(f"distill: the rewritten model's outputs {self.student.outputs} are not the "
                             f"original's {self.teacher.outputs}")
        self.names = self.student.outputs
        self.rewritten = rewritten_tensors(model, teacher)

    def fit(self) -> tuple[onnx.ModelProto, dict]:
        with torch_settings(self.ctx.seed, self.opts.threads):
            return self._fit()

    def _fit(self) -> tuple[onnx.ModelProto, dict]:
        start = time.perf_counter()
        probe = next(_chunks(self.train, 2))
        mse, nst = self._features(probe)
        self.keep = keep = sorted(set(mse) | set(nst))
        self.batched = not self.whole and takes_batches(self.student, probe, keep) and takes_batches(
            self.teacher, probe, keep)
        self.val_ref = self._outputs(self.teacher, self.val)
        self.layouts = layouts = infer_layouts(self.teacher_model, self.val_ref, self.val.labels,
                                                   self.ctx.output_axes)
        self.loss = self._loss_setup(layouts, mse, nst)
        before = self._evaluate()
        self.ctx.log(f"distill: {len(self.student.params)} float initializers trained on {len(self.train)} samples, "
                     f"{len(self.val)} held out (drop {before['drop']:.4f}); features: {len(mse)} mse, {len(nst)} nst")
        if before["drop"] <= IMPROVEMENT:  # already answers like the original on held-out samples
            history, best, stopped, steps = [], None, "nothing to recover", 0
        else:
            history, best, stopped, steps = self._train_with_fallback(before, start)
        kept = best is None
        if not kept:
            self._restore(best)
        after = before if kept else self._evaluate()
        notes = {"steps": steps, "stopped": stopped, "seconds": round(time.perf_counter() - start, 2),
                 "train_samples": len(self.train), "val_samples": len(self.val), "batched": self.batched,
                 "trained_initializers": len(self.student.params), "loss": dict(self.loss.terms),
                 "temperatures": {k: round(v, 3) for k, v in self.loss.temperatures.items()},
                 "features": {"feat": mse, "nst": nst}, "val_before": before, "val_after": after,
                 "history": history}
        if kept:
            notes["kept"] = "the original weights: no step lowered the held-out loss"
            return self.model, notes
        return self.student.write_back(self.model), notes

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every trained value, to come back to."""
        return {k: p.detach().clone() for k, p in self.student.params.items()}

    def _restore(self, values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self.student.params[name].copy_(value)

    def _features(self, probe: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
        """Rewritten layers' outputs both models compute: same shape for MSE, same positions for MMD."""
        if not self.rewritten or not self.opts.features:
            return [], []
        one = {k: v[:1] for k, v in probe.items()}
        with torch.no_grad():
            s = run_graph(self.student, one, self.rewritten, False, self.whole)
            t = run_graph(self.teacher, one, self.rewritten, False, self.whole)
        floats = [n for n in self.rewritten if s[n].is_floating_point() and s[n].dim() >= 2]
        mse = [n for n in floats if s[n].shape == t[n].shape]
        nst = [n for n in floats if s[n].dim() >= 3 and s[n].shape[2:] == t[n].shape[2:] and s[n].shape[2:].numel() > 1]
        terms = self.opts.terms
        return (spread(mse, self.opts.features) if terms.get("feat") else [],
                spread(nst, self.opts.features) if terms.get("nst") else [])

    def _outputs(self, graph: TorchGraph, data: Calibration, keep: Sequence[str] = (),
                 each: Callable[[Mapping[str, np.ndarray], dict[str, torch.Tensor]], None] | None = None,
                 ) -> dict[str, list[np.ndarray]]:
        """Per-sample outputs (as onnxruntime returns them), run in chunks without gradients. `each(feeds, values)`
        sees every chunk's values (the outputs and the `keep` tensors, joined as the losses read them), so that
        one run serves both."""
        found: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        with torch.no_grad():
            for feeds in _chunks(data, self.opts.batch):
                if self.batched:
                    values = run_graph(graph, feeds, keep, True)
                    for name in self.names:
                        found[name] += per_sample(values[name])
                else:  # each sample's outputs as they are, whatever axis holds its batch of 1
                    runs = run_samples(graph, feeds, keep, self.whole)
                    for run in runs:
                        for name in self.names:
                            found[name].append(run[name].numpy())
                    values = join_runs(runs) if each is not None else {}  # joined only for a caller that reads them
                if each is not None:
                    each(feeds, values)
        return found

    def _evaluate(self) -> dict:
        """The pipeline's fidelity figures on the held-out split, and the training loss there on clean inputs,
        from one run of the student."""
        total, count = 0.0, 0

        def score(feeds: Mapping[str, np.ndarray], student: dict[str, torch.Tensor]) -> None:
            nonlocal total, count
            teacher = run_graph(self.teacher, feeds, self.keep, self.batched, self.whole)
            n = len(next(iter(feeds.values())))
            total, count = total + n * float(self.loss.total(self.loss(student, teacher))), count + n

        outputs = self._outputs(self.student, self.val, self.keep, score)
        figures = fidelity_drop(self.names, self.val_ref, outputs, self.layouts)
        return {**figures, "loss": round(total / count, 7)}

    def _loss_setup(self, layouts, mse: list[str], nst: list[str]) -> LossSetup:
        stats = self.train.take(np.arange(min(len(self.train), STATS_SAMPLES)))
        with torch.no_grad():
            runs = [run_graph(self.teacher, feeds, mse, self.batched, self.whole)
                    for feeds in _chunks(stats, self.opts.batch)]
        joined = {name: torch.cat([r[name] for r in runs]) for name in [*self.names, *mse]}
        output_var = {n: channel_variance(joined[n], layouts[n].feature_axis) for n in self.names}
        feature_var = {n: channel_variance(joined[n], 1) for n in mse}
        temperatures = {n: fitted_temperature(joined[n], layouts[n], self.opts.temperature)
                        for n in self.names if layouts[n].has_classes}
        for name, value in temperatures.items():
            if value < self.opts.temperature:
                self.ctx.log(f"distill: output {name}: temperature {value:.2f} (at {self.opts.temperature:g} the "
                             f"teacher's top class would keep under {TOP_SHARE:.0%} of the softened mass)")
        return LossSetup(self.opts.terms, layouts, output_var, feature_var, mse, nst, temperatures)

    def _train_with_fallback(self, before: dict, start: float) -> tuple[list, dict | None, str, int]:
        """Train on augmented inputs; if no state lowers the held-out loss, train again from the start on the
        inputs as they are. An augmentation is only plausible for some inputs: a mirrored or shifted text line
        is not what a recogniser reads, and on PP-OCRv4's every augmented run raised the loss on real lines."""
        initial = self._snapshot()
        history, best, stopped, steps = self._train(before, start, self.opts.augment)
        if best is not None or not self.opts.augment or not steps or stopped == "time budget":
            return history, best, stopped, steps
        self.ctx.log("distill: training on augmented inputs never lowered the held-out loss; training again on the "
                     "calibration inputs as they are")
        self._restore(initial)
        again, best, stopped, more = self._train(before, start, ())
        return history + [{**h, "augment": "none"} for h in again], best, stopped, steps + more

    def _train(self, best_fid: dict, start: float, kinds) -> tuple[list, dict | None, str, int]:
        opts = self.opts
        params = list(self.student.params.values())
        if not params or not opts.steps:
            return [], None, "nothing to train" if not params else "steps=0", 0
        optimizer = torch.optim.Adam(_relative_groups(params, opts.lr))
        warm = max(1, opts.steps // 10)  # Adam's first steps are full-size even on noise: ramp up, then cosine down
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / opts.steps)))
        rng = np.random.default_rng(self.ctx.seed)
        stds = {k: float(v.std()) if v.dtype.kind == "f" else 0.0 for k, v in self.train.inputs.items()}
        order, cursor = rng.permutation(len(self.train)), 0
        deadline = start + 60.0 * opts.minutes
        best, bad, history, stopped, running = None, 0, [], "steps", []
        step = 0
        for step in range(1, opts.steps + 1):
            if cursor + opts.batch > len(order):
                order, cursor = rng.permutation(len(self.train)), 0
            index = np.sort(order[cursor: cursor + opts.batch])
            cursor += opts.batch
            feeds = augment({k: v[index] for k, v in self.train.inputs.items()}, kinds, stds, rng, self.whole)
            running.append(self._step(optimizer, feeds))
            schedule.step()
            if step % opts.eval_every and step != opts.steps and time.perf_counter() < deadline:
                continue
            fid = self._evaluate()
            loss = float(np.mean(running))
            running = []
            history.append({"step": step, "loss": round(loss, 6), "val_loss": fid["loss"],
                            **{k: v for k, v in fid.items() if k not in ("score", "loss")}})
            if _better(fid, best_fid):
                best_fid, bad = fid, 0
                best = self._snapshot()
            else:
                bad += 1
            self.ctx.log(f"distill: step {step}/{opts.steps} loss {loss:.5f} held-out loss {fid['loss']:.5f} "
                         f"(best {best_fid['loss']:.5f}), drop {fid['drop']:.4f}, "
                         f"worst channel cosine {fid['channel_cosine_min']:.4f}"
                         + (f", top-1 {fid['top1_agreement']:.4f}" if "top1_agreement" in fid else ""))
            if time.perf_counter() >= deadline:
                stopped = "time budget"
                break
            if bad >= opts.patience and step < opts.steps:
                stopped = "early stop: the held-out loss stopped improving"
                break
        return history, best, stopped, step

    def _step(self, optimizer: torch.optim.Optimizer, feeds: Mapping[str, np.ndarray]) -> float:
        with torch.no_grad():
            t = run_graph(self.teacher, feeds, self.keep, self.batched, self.whole)
        s = run_graph(self.student, feeds, self.keep, self.batched, self.whole)
        loss = self.loss.total(self.loss(s, t))
        if not torch.isfinite(loss):
            raise ModelError("distill: the loss became non-finite; try a smaller --opt distill.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
