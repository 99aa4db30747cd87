"""The distill pass's losses: teacher outputs (Hinton 2015), feature maps (MSE, or MMD as in neuron
selectivity transfer, Huang & Wang 2017) and cross-sample similarity rankings (DarkRank, Chen et al. 2017).

Every function takes student and teacher tensors of a batch (samples on axis 0) and returns a scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from rewriter.layouts import OutputLayout

_EPS = 1e-7


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(B, ...) -> (B, C, positions) along the output's feature axis (axis counted with the batch axis). An
    output of one value per sample (B,) is one channel."""
    if axis is None or x.dim() < 2:
        return x.reshape(x.shape[0], 1, -1)
    return x.movedim(axis, 1).reshape(x.shape[0], x.shape[axis], -1)


def channel_variance(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-channel variance of the teacher over samples and positions, floored so that silent channels count
    at no less than 1 % of the average (they must stay silent, not dominate)."""
    channels = _channels_first(x, axis)
    flat = channels.transpose(0, 1).reshape(channels.shape[1], -1)
    var = flat.double().var(dim=1, unbiased=False).float()
    return var.clamp_min(1e-2 * float(var.mean()) + 1e-12)


def balanced_mse(s: torch.Tensor, t: torch.Tensor, axis: int | None, var: torch.Tensor,
                 channels: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per channel divided by the teacher's variance there: box coordinates in pixels weigh as much as
    class scores in [0, 1]. `channels` restricts it to some channels (a bool mask)."""
    err = (_channels_first(s, axis) - _channels_first(t, axis)).pow(2).mean(dim=(0, 2)) / var
    return err[channels].mean() if channels is not None else err.mean()


def _logits(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, bool]:
    """Values -> (logits, independent sigmoid scores?) by how the output normalises its class scores."""
    if kind == "sigmoid":
        return torch.logit(x.clamp(_EPS, 1 - _EPS)), True
    if kind in ("softmax", "probabilities"):
        return torch.log(x.clamp_min(1e-30)), False
    return x, False  # log-softmax, raw logits (labels / given)


def _class_values(x: torch.Tensor, layout: OutputLayout) -> tuple[torch.Tensor, bool]:
    """The output's class channels as logits, and whether they are independent sigmoid scores."""
    axis = layout.feature_axis
    if layout.class_channels is not None:
        start, stop = layout.class_channels
        x = x.narrow(axis, start, stop - start)
    return _logits(x, layout.scores)


TOP_SHARE = 0.5  # the softened teacher must keep at least this much of its mass on its top class
POSITIONS = 4096  # positions that set an output's temperature, at most


def fitted_temperature(t: torch.Tensor, layout: OutputLayout, ceiling: float) -> float:
    """The largest temperature up to `ceiling` at which the teacher's softened top class keeps TOP_SHARE of
    the mass on average. Softening shows the student the ranking below the top (Hinton's dark knowledge); over
    a long class axis it spreads the mass over classes the teacher rules out: at 4 over PP-OCRv4's 6,625
    characters the tail holds most of it and the loss mostly asks for its order. Sigmoid scores are independent
    two-way targets and keep the ceiling."""
    logits, independent = _class_values(t, layout)
    if independent or logits.shape[layout.feature_axis] < 3 or ceiling <= 1.0:
        return ceiling
    rows = logits.movedim(layout.feature_axis, -1).reshape(-1, logits.shape[layout.feature_axis]).double()
    rows = rows[torch.linspace(0, len(rows) - 1, min(len(rows), POSITIONS)).long()]

    def top_share(temperature: float) -> float:
        return float(torch.softmax(rows / temperature, dim=1).max(dim=1).values.mean())

    if top_share(ceiling) >= TOP_SHARE:
        return ceiling
    if top_share(1.0) < TOP_SHARE:
        return 1.0  # an unsure teacher: its own distribution, not a sharpened one
    low, high = 1.0, ceiling  # top_share falls as the temperature rises
    for _ in range(30):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if top_share(mid) >= TOP_SHARE else (low, mid)
    return low


def soft_target_loss(s: torch.Tensor, t: torch.Tensor, layout: OutputLayout, temperature: float) -> torch.Tensor:
    """Hinton's softened-logit loss along the class axis (T^2-scaled), on the class channels only."""
    axis = layout.feature_axis
    s_logit, independent = _class_values(s, layout)
    t_logit, _ = _class_values(t, layout)
    s_logit, t_logit = s_logit / temperature, t_logit / temperature
    if independent:
        loss = F.binary_cross_entropy_with_logits(s_logit, torch.sigmoid(t_logit))
        loss = loss - F.binary_cross_entropy_with_logits(t_logit, torch.sigmoid(t_logit))  # 0 at a perfect match
    else:
        t_log = F.log_softmax(t_logit, dim=axis)
        loss = (t_log.exp() * (t_log - F.log_softmax(s_logit, dim=axis))).sum(dim=axis).mean()
    return loss * temperature**2


def nst_mmd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer: MMD^2 with the polynomial kernel (x.y)^2 between the student's and the
    teacher's channels, each channel's spatial map L2-normalised. Channel counts may differ (pruned layers)."""
    fs = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2)
    ft = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
    ss = (fs @ fs.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    tt = (ft @ ft.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    st = (fs @ ft.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    return (ss + tt - 2 * st).mean()


def dark_rank(s: torch.Tensor, t: torch.Tensor, alpha: float = 3.0, beta: float = 3.0) -> torch.Tensor:
    """DarkRank's listwise loss: for each sample of the batch, the likelihood (ListMLE) under the student's
    similarity scores -alpha * d^beta of the order in which the teacher ranks the other samples."""
    n = s.shape[0]
    if n < 3:
        return s.new_zeros(())
    es, et = F.normalize(s.reshape(n, -1), dim=1), F.normalize(t.reshape(n, -1), dim=1)
    mask = ~torch.eye(n, dtype=torch.bool)
    ds = torch.cdist(es, es)[mask].reshape(n, n - 1)
    dt = torch.cdist(et, et)[mask].reshape(n, n - 1)
    order = dt.argsort(dim=1)  # teacher's ranking, nearest first
    scores = (-alpha * (ds + 1e-12).pow(beta)).gather(1, order)
    tails = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)  # log-sum-exp of each suffix of the ranking
    return (tails - scores).sum(dim=1).mean() / (n - 1)


@dataclass
class LossSetup:
    """What the loss reads: output layouts, teacher statistics, matched feature tensors."""

    terms: Mapping[str, float]
    layouts: Mapping[str, OutputLayout]
    output_var: Mapping[str, torch.Tensor]
    feature_var: Mapping[str, torch.Tensor]
    mse_features: list[str]
    nst_features: list[str]
    temperatures: Mapping[str, float]  # per output with classes (fitted_temperature)

    def output_terms(self, s: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = next(iter(s.values())).new_zeros(())
        for name, layout in self.layouts.items():
            axis = layout.feature_axis  # counted with the batch axis, as for one sample of batch 1
            if layout.has_classes:
                total = total + soft_target_loss(s[name], t[name], layout, self.temperatures[name])
                rest = self._non_class_mask(layout, self.output_var[name].numel())
                if rest is not None:
                    total = total + balanced_mse(s[name], t[name], axis, self.output_var[name], rest)
            else:
                total = total + balanced_mse(s[name], t[name], axis, self.output_var[name])
        return total / max(len(self.layouts), 1)

    @staticmethod
    def _non_class_mask(layout: OutputLayout, channels: int) -> torch.Tensor | None:
        if layout.class_channels is None:
            return None
        mask = torch.ones(channels, dtype=torch.bool)
        mask[layout.class_channels[0]: layout.class_channels[1]] = False
        return mask if bool(mask.any()) else None

    def __call__(self, s: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = {}
        if self.terms.get("kd"):
            parts["kd"] = self.output_terms(s, t)
        if self.terms.get("feat") and self.mse_features:
            parts["feat"] = sum(balanced_mse(s[n], t[n], 1, self.feature_var[n])
                                for n in self.mse_features) / len(self.mse_features)
        if self.terms.get("nst") and self.nst_features:
            parts["nst"] = sum(nst_mmd(s[n], t[n]) for n in self.nst_features) / len(self.nst_features)
        if self.terms.get("rank"):
            parts["rank"] = dark_rank(*self._embeddings(s, t))
        return parts

    def _embeddings(self, s, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The deepest matched feature map, pooled over positions; else the outputs themselves."""
        if self.nst_features or self.mse_features:
            name = (self.nst_features or self.mse_features)[-1]
            if s[name].shape[1] == t[name].shape[1]:
                return (s[name].reshape(*s[name].shape[:2], -1).mean(dim=2),
                        t[name].reshape(*t[name].shape[:2], -1).mean(dim=2))
        names = list(self.layouts)
        return (torch.cat([s[n].reshape(s[n].shape[0], -1) for n in names], dim=1),
                torch.cat([t[n].reshape(t[n].shape[0], -1) for n in names], dim=1))

    def total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.terms[k] * v for k, v in parts.items())
