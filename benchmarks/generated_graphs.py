"""Every pass on many randomly generated graphs: how often it changed the graph, left it unchanged, refused it
in one line, or failed (an invalid graph, a crash, non-finite or differently shaped outputs).

    python benchmarks/generated_graphs.py --graphs 1000            # every registered pass
    python benchmarks/generated_graphs.py --graphs 200 --passes svd,prune
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import table  # noqa: E402

from rewriter.progress import set_quiet  # noqa: E402
from rewriter.registry import available_passes  # noqa: E402
from tests.graphs import random_graph, try_pass  # noqa: E402


def _chooser(rng: np.random.Generator):
    return lambda options: options[int(rng.integers(len(options)))]


def _outcome(model, name: str) -> str:
    try:
        return try_pass(model, name).split(":")[0]
    except AssertionError as exc:
        print(f"  {name}: FAILED: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return "failed"
    except Exception as exc:  # noqa: BLE001 - counted and shown: a crash is a finding
        print(f"  {name}: CRASH: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--passes", default=",".join(available_passes()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_quiet(True)
    rows = []
    for name in args.passes.split(","):
        choose = _chooser(np.random.default_rng(args.seed))
        counts: collections.Counter = collections.Counter()
        start = time.perf_counter()
        for _ in range(args.graphs):
            model = random_graph(choose)
            counts[_outcome(model, name)] += 1
        rows.append([name, args.graphs, counts["changed"], counts["unchanged"], counts["refused"], counts["failed"],
                     f"{time.perf_counter() - start:.0f}"])
        print(table(["pass", "graphs", "changed", "unchanged", "refused (one line)", "failed", "seconds"], rows[-1:]),
              file=sys.stderr)
    print(table(["pass", "graphs", "changed", "unchanged", "refused (one line)", "failed", "seconds"], rows))


if __name__ == "__main__":
    main()
