"""`distill`: teacher–student recovery of a rewritten model on unlabelled calibration inputs.

The rewritten graph runs differentiably in PyTorch (passes/_torch_graph.py) with its own float initializers
as the parameters, keyed by their ONNX names: kept weights of pruned layers, PQ codebooks (gradients flow
through the Gather, as Stock et al. 2019 fine-tune centroids), binary scales, low-rank factors, biases, BN
scale and shift. Codes, bit patterns, shapes and the nodes never change; trained values go back into the same
initializers. The teacher is the model before any pass, run by the same interpreter (which reproduces
onnxruntime). Losses (passes/_distill_loss.py): softened outputs along class axes and per-channel balanced MSE
elsewhere (kd), feature maps at the rewritten layers' outputs by MSE (feat) or by MMD as in neuron
selectivity transfer (nst), and DarkRank's similarity ranking across a batch (rank).

Cost is bounded by a step and a time budget; a split of the fit samples measures the loss on clean inputs (which
chooses the state) and the pipeline's fidelity figures every few steps, the state of lowest held-out loss is kept,
and training stops when it no longer improves.
If it never beats the starting model, the model is returned unchanged. PyTorch is an optional extra.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx

from rewriter import fidelity
from rewriter.errors import UsageError
from rewriter.pass_api import PassContext, PassResult
from rewriter.registry import register_pass

from ._distill_options import parse_augment, parse_terms

NEEDS_DATA = "it fine-tunes the rewritten model to match the original on calibration inputs"
INSTALL = "pass 'distill' needs PyTorch: pip install 'rewriter[distill]'"
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


@register_pass("distill")
class DistillPass:
    """Fine-tune the rewritten model's float initializers to match the original model."""

    name = "distill"
    keeps_graph = True  # only initializer values change: --budget runs it once, after the rounds that cut

    def __init__(
        self,
        *,
        steps: int = 200,
        lr: float = 1e-3,
        batch: int = 16,
        loss: str = "kd,feat",
        temperature: float = 4.0,
        augment: str = "flip,crop,noise",
        minutes: float = 20.0,
        eval_every: int = 20,
        patience: int = 5,
        holdout: float = 0.2,
        features: int = 8,
        threads: int = 2,
    ) -> None:
        if steps < 0 or batch < 1 or eval_every < 1 or patience < 1 or features < 0 or threads < 1:
            raise ValueError("steps, features must be >= 0; batch, eval_every, patience, threads >= 1")
        if not lr > 0 or not temperature > 0 or not minutes > 0 or not 0 < holdout < 1:
            raise ValueError("lr, temperature and minutes must be > 0; holdout in (0, 1)")
        self.terms = parse_terms(loss)
        self.loss_text, self.augment = loss, parse_augment(augment)
        self.steps, self.lr, self.batch, self.temperature = steps, lr, batch, temperature
        self.minutes, self.eval_every, self.patience = minutes, eval_every, patience
        self.holdout, self.features, self.threads = holdout, features, threads

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if not torch_available():
            raise UsageError(INSTALL)
        from ._distill_train import Trainer

        data = ctx.require_data("distill", NEEDS_DATA)
        if len(data) < 2:
            raise UsageError("pass 'distill' needs at least 2 fit samples (one to train on, one to check)")
        teacher = ctx.teacher if ctx.teacher is not None else model
        if teacher.graph.SerializeToString() == model.graph.SerializeToString():
            ctx.log("distill: the model is still the original; nothing to recover")
            return PassResult(model, [], {"kept": "the model is the original (no pass before distill)"})
        trainer = Trainer(self, model, teacher, data, ctx)
        trained, notes = trainer.fit()
        changed = changed_layers(model, trained)
        return PassResult(trained, changed, notes)


def layer_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.output[0]: node for node in model.graph.node if node.op_type in LAYER_OPS}


def rewritten_tensors(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Outputs of the student's layers that the teacher computes too, where the layer's weights differ
    (another name: decoded by PQ or binary; other values: pruned, refitted, low-rank), in graph order."""
    weights = {t.name: t for t in teacher.graph.initializer}
    student_weights = {t.name: t for t in student.graph.initializer}
    theirs = layer_outputs(teacher)
    found = []
    for name, node in layer_outputs(student).items():
        old = theirs.get(name)
        if old is None or len(node.input) < 2:
            continue
        a, b = student_weights.get(node.input[1]), weights.get(old.input[1])
        if node.input[1] != old.input[1] or a is None or b is None or a.SerializeToString() != b.SerializeToString():
            found.append(name)
    outputs = {o.name for o in student.graph.output}
    return [n for n in found if n not in outputs]


def spread(names: list[str], count: int) -> list[str]:
    """`count` names evenly spread over the list (first and last kept)."""
    if count <= 0 or not names:
        return []
    if len(names) <= count:
        return names
    picks = np.unique(np.round(np.linspace(0, len(names) - 1, count)).astype(int))
    return [names[i] for i in picks]


def changed_layers(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Nodes that read an initializer whose values the pass changed."""
    old = {t.name: t.SerializeToString() for t in before.graph.initializer}
    moved = {t.name for t in after.graph.initializer if old.get(t.name) != t.SerializeToString()}
    return [n.name or n.output[0] for n in after.graph.node if moved & set(n.input)]


def fidelity_drop(names, reference, new, layouts) -> dict:
    """The pipeline's own fidelity figures on the distill validation samples, plus `score`: the same figures
    summed over outputs without the cap at 1, so that progress on a wrecked model still shows."""
    found = fidelity.compare(names, reference, new, layouts)
    keep = ("drop", "channel_cosine_min", "cosine", "top1_agreement")
    figures = {k: round(float(found[k]), 6) for k in keep if k in found}
    per_output = found["outputs"].values()
    figures["score"] = float(sum(2.0 - f["channel_cosine_min"] - f["cosine"] + (1.0 - f.get("top1_agreement", 1.0))
                                 for f in per_output))
    return figures
