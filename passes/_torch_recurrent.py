"""ONNX LSTM, GRU and RNN as plain torch ops, for the distill pass's interpreter.

A time loop over the ONNX equations (not torch.nn.LSTM), so that W, R, B and P stay the graph's own initializers
and gradients reach them by name. Gate orders are ONNX's: LSTM i, o, f, c; GRU z, r, h. `clip` bounds every gate's
pre-activation, as onnxruntime does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewriter.errors import ModelError

from ._torch_ops import text

_ACTIVATIONS: dict[str, Callable] = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
_DEFAULTS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _activations(op: str, attrs: dict, directions: int) -> list[list[Callable]]:
    """One list of activation functions per direction (the attribute lists the forward set, then the reverse)."""
    default = _DEFAULTS[op]
    names = [text(a).lower() for a in attrs.get("activations", [])] or list(default) * directions
    if len(names) != len(default) * directions:
        raise ModelError(f"distill: {op} has {len(names)} activations, expected {len(default) * directions}")
    unknown = sorted(set(names) - set(_ACTIVATIONS))
    if unknown:
        raise ModelError(f"distill: {op} activation(s) {', '.join(unknown)} not supported (Sigmoid, Tanh, Relu are)")
    fns = [_ACTIVATIONS[n] for n in names]
    return [fns[d * len(default):(d + 1) * len(default)] for d in range(directions)]


def _lstm_cell(xw, state, r, rb, p, acts, clip):
    (h, c), (f_act, g_act, h_act) = state, acts
    i, o, f, g = (xw + h @ r.t() + rb).chunk(4, -1)
    if p is not None:
        pi, po, pf = p.chunk(3)
        i, f = i + pi * c, f + pf * c
    c = f_act(clip(f)) * c + f_act(clip(i)) * g_act(clip(g))
    if p is not None:
        o = o + po * c
    return f_act(clip(o)) * h_act(c), c


def _gru_cell(xw, state, r, rb, linear_before_reset, acts, clip):
    (h,), (f_act, g_act) = state, acts
    hidden = h.shape[-1]
    xz, xr, xh = xw.chunk(3, -1)
    rz, rr, rh = r.split(hidden)
    bz, br, bh = rb.chunk(3, -1)
    z = f_act(clip(xz + h @ rz.t() + bz))
    reset = f_act(clip(xr + h @ rr.t() + br))
    if linear_before_reset:
        candidate = g_act(clip(xh + reset * (h @ rh.t() + bh)))
    else:
        candidate = g_act(clip(xh + (reset * h) @ rh.t() + bh))
    return ((1 - z) * candidate + z * h,)


def _rnn_cell(xw, state, r, rb, acts, clip):
    (h,), (f_act,) = state, acts
    return (f_act(clip(xw + h @ r.t() + rb)),)


def _run_direction(op, attrs, x, w, r, b, state, p, acts, reverse):
    """One direction over time: Y [T, B, H] and the final states."""
    hidden = r.shape[-1]
    gates = _GATES[op] * hidden
    b = x.new_zeros(2 * gates) if b is None else b
    wb, rb = b[:gates], b[gates:]
    xw = x @ w.t() + wb  # the input projections of every step at once
    limit = attrs.get("clip")
    clip = (lambda v: v.clamp(-limit, limit)) if limit is not None else (lambda v: v)
    if op == "LSTM":
        step = lambda xt, s: _lstm_cell(xt, s, r, rb, p, acts, clip)  # noqa: E731
    elif op == "GRU":
        step = lambda xt, s: _gru_cell(xt, s, r, rb, attrs.get("linear_before_reset", 0), acts, clip)  # noqa: E731
    else:
        step = lambda xt, s: _rnn_cell(xt, s, r, rb, acts, clip)  # noqa: E731
    times = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    ys = [None] * x.shape[0]
    for t in times:
        state = step(xw[t], state)
        ys[t] = state[0]
    return torch.stack(ys), state


def _initial(value, directions, batch, hidden, like):
    if value is None:
        return like.new_zeros(directions, batch, hidden)
    return value.expand(directions, batch, hidden) if value.shape[1] == 1 else value


def recurrent(op: str, attrs: dict, x, w, r, b=None, lens=None, h0=None, c0=None, p=None) -> list:
    """Y [T, D, B, H], Y_h [D, B, H] (and Y_c for LSTM); with layout=1 batch comes first in X, Y, Y_h, Y_c."""
    if op == "LSTM" and attrs.get("input_forget", 0):
        raise ModelError("distill: LSTM with input_forget=1 is not supported")
    layout = attrs.get("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        h0, c0 = (v.transpose(0, 1) if v is not None else None for v in (h0, c0))
    steps, batch = x.shape[:2]
    if lens is not None and lens.numel() and bool((lens != steps).any()):
        raise ModelError(f"distill: {op} with sequence_lens shorter than the sequence ({steps}) is not supported")
    direction = text(attrs.get("direction", b"forward"))
    directions = 2 if direction == "bidirectional" else 1
    acts = _activations(op, attrs, directions)
    hidden = r.shape[-1]
    h0 = _initial(h0, directions, batch, hidden, x)
    c0 = _initial(c0, directions, batch, hidden, x)
    ys, finals = [], []
    for d in range(directions):
        state = (h0[d], c0[d]) if op == "LSTM" else (h0[d],)
        peep = p[d] if p is not None and p.numel() else None
        y, state = _run_direction(op, attrs, x, w[d], r[d], b[d] if b is not None else None, state, peep, acts[d],
                                  reverse=direction == "reverse" or d == 1)
        ys.append(y)
        finals.append(state)
    y = torch.stack(ys, 1)
    outs = [y] + [torch.stack([f[k] for f in finals]) for k in range(len(finals[0]))]
    if layout:
        outs = [y.permute(2, 0, 1, 3)] + [o.transpose(0, 1) for o in outs[1:]]
    return outs
