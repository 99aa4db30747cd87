"""The `rewrite` command line (its contract: flags, outputs, exit codes)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tomllib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .api import rewrite
from .canonical import parse_input_shape
from .errors import RewriterError, Terminated, UsageError, request_stop, stop_requested, stop_signal
from .inspection import format_table, inspect_model
from .layouts import parse_output_axis
from .progress import set_quiet
from .registry import available_passes, pass_options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        print(f"rewrite: error: {message}", file=sys.stderr)
        sys.exit(UsageError.exit_code)


def _passes_help() -> str:
    lines = ["passes and their options (--opt PASS.KEY=VALUE):"]
    for name in available_passes():
        options = ", ".join(f"{k}={v}" for k, v in pass_options(name).items())
        lines.append(f"  {name}: {options}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rewrite", description="Rewrite an ONNX model through compression passes and build it with TVM.",
                epilog=_passes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("--passes", default=None, help="comma-separated passes, in order (omit: canonicalise only)")
    p.add_argument("--target", default=None, help="x86, arm, cuda, none, or a TVM target as JSON (default none)")
    p.add_argument("-o", "--out", dest="out_dir", default=None, help="output directory (default ./<stem>.rewritten)")
    p.add_argument("--calib", default=None, help="calibration FILE.npz (one array per input), or 'synthetic'")
    p.add_argument("--opt", action="append", default=[], metavar="PASS.KEY=VALUE", help="a pass option")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="defaults for these flags; flags win")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3xHxW", help="fix an input shape")
    p.add_argument("--max-drop", type=float, default=None,
                   help="refuse (exit 4) a pass whose fidelity drop exceeds X at every milder setting tried "
                   "(default: no refusal; passes are retried milder above a drop of 0.05)")
    p.add_argument("--holdout", type=float, default=None, help="share of calibration held out for fidelity (0.25)")
    p.add_argument("--seed", type=int, default=None, help="seed for every random choice (default 0)")
    p.add_argument("--tune-trials", type=int, default=None, help="MetaSchedule trials (default 0: no tuning)")
    p.add_argument("--tuning-db", default=None, metavar="DIR", help="tuning database to reuse and extend")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT",
                   help="a TVM RPC tracker: --bench times the artifact on one of its devices")
    p.add_argument("--device-key", default=None, help="RPC device key (with --rpc)")
    p.add_argument("--bench", action="store_true", help="time original, rewritten model and artifact")
    p.add_argument("--budget", default=None, metavar="macs=0.5",
                   help="keep at most this share of MACs, params or size (e.g. macs=0.5,size=0.3): prune and svd "
                        "cut each channel group/layer as far as its measured sensitivity allows")
    p.add_argument("--target-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="preset option: mcpu (x86, arm), mattr (arm), num-cores (x86), arch (cuda)")
    p.add_argument("--output-axis", action="append", default=[], metavar="NAME=AXIS[:scores]",
                   help="the feature axis of an output for fidelity (':scores' if it holds class scores)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version="rewrite 0.1.0")
    return p


def parse_opts(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """['svd.rank_ratio=0.25'] -> {'svd': {'rank_ratio': '0.25'}}."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot or not pass_name or not option:
            raise UsageError(f"malformed --opt {item!r}: expected PASS.KEY=VALUE")
        options.setdefault(pass_name.strip(), {})[option.strip()] = value
    return options


def parse_budget(text: str | None) -> dict[str, float] | None:
    """'macs=0.5' -> {'macs': 0.5}."""
    if text is None:
        return None
    budget = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            budget[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"malformed --budget {text!r}: expected macs=0.5") from None
        if not sep:
            raise UsageError(f"malformed --budget {text!r}: expected macs=0.5")
    return budget


def _read_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from exc


def _merged(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over the TOML config over built-in defaults."""
    config = _read_config(args.config)
    for key in ("options", "input_shapes", "output_axes", "budget", "target_options"):
        if key in config and not isinstance(config[key], dict):
            raise UsageError(f"{key} in {args.config} must be a table, got {config[key]!r}")
    known = {"passes", "target", "out_dir", "calib", "options", "input_shapes", "max_drop", "holdout", "seed",
             "tune_trials", "tuning_db", "force", "bench", "budget", "output_axes", "target_options", "rpc",
             "device_key"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"unknown key(s) in {args.config}: {', '.join(unknown)}")
    passes = args.passes if args.passes is not None else config.get("passes", [])
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    options = {k: dict(v) for k, v in config.get("options", {}).items()}
    for name, values in parse_opts(args.opt).items():
        options.setdefault(name, {}).update(values)
    axes = dict(config.get("output_axes", {}))
    for item in args.output_axis:
        name, _, axis = item.rpartition("=")
        parse_output_axis(item)  # one message for a malformed flag
        axes[name] = axis
    shapes = dict(config.get("input_shapes", {}))
    shapes.update(parse_input_shape(s) for s in args.input_shape)

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)  # None (or False for a switch) means the flag was not given
        return config.get(name, default) if value is None or value is False else value

    return {
        "passes": passes, "options": options, "input_shapes": shapes or None,
        "target": pick("target", "none"), "calib": pick("calib", None), "max_drop": pick("max_drop", None),
        "holdout": pick("holdout", 0.25), "seed": pick("seed", 0), "tune_trials": pick("tune_trials", 0),
        "tuning_db": pick("tuning_db", None), "force": pick("force", False),
        "out_dir": pick("out_dir", None) or f"{Path(args.model).stem}.rewritten", "bench": pick("bench", False),
        "budget": parse_budget(args.budget) if args.budget else config.get("budget"),
        "output_axes": axes or None, "rpc": pick("rpc", None), "device_key": pick("device_key", None),
        "target_options": {**config.get("target_options", {}), **_pairs(args.target_opt, "--target-opt")} or None,
    }


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"malformed {flag} {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _terminate(signum, frame) -> NoReturn:
    request_stop(signum)


def _stopped(signum: int) -> int:
    """Exit 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as shells report a killed command."""
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    print(f"rewrite: {word}; nothing written", file=sys.stderr)
    return 128 + int(signum)


def _inspect(argv: Sequence[str]) -> int:
    """`rewrite inspect MODEL [--json] [--input-shape NAME=1x3xHxW]`: the layer table, nothing written."""
    p = _Parser(prog="rewrite inspect", description="per-layer table of a model; changes nothing")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3xHxW")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    set_quiet(True)
    try:
        info = inspect_model(args.model, dict(parse_input_shape(s) for s in args.input_shape) or None)
    except RewriterError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"rewrite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:
        return _inspect(argv[1:])
    args = build_parser().parse_args(argv)
    set_quiet(args.quiet)
    try:
        settings = _merged(args)
        previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            result = rewrite(args.model, **settings)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except Terminated as exc:
        return _stopped(exc.signum)
    except Exception as exc:
        if stop_requested():  # the signal came back wrapped in another error
            return _stopped(stop_signal())
        if isinstance(exc, RewriterError):
            if args.debug:
                traceback.print_exc()
            print(f"rewrite: error: {exc}", file=sys.stderr)
            return exc.exit_code
        if args.debug:  # an internal bug: still one line unless --debug
            traceback.print_exc()
        print(f"rewrite: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT)
    print(result.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
