"""`rewrite inspect`: the layer table, for people and for machines, without changing anything."""

from __future__ import annotations

import hashlib
import json

from rewriter.cli import main
from tests.helpers import SAMPLES

RESNET = SAMPLES / "digits_resnet.onnx"


def test_inspect_json_lists_every_weighted_layer_with_its_group_and_passes(capsys):
    before = hashlib.sha256(RESNET.read_bytes()).hexdigest()
    assert main(["inspect", str(RESNET), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    layers = {row["name"]: row for row in info["layers"]}
    assert len(layers) == 9 and sum(r["macs"] for r in layers.values()) == info["macs"]
    residual = [r["group"] for n, r in layers.items() if n.endswith("body.3/Conv")]
    assert len(set(residual[:1] + [layers["/stem/stem.0/Conv"]["group"]])) == 1  # the residual sum couples them
    assert all("svd" in r["passes"] for r in layers.values() if r["op"] == "Conv")
    assert hashlib.sha256(RESNET.read_bytes()).hexdigest() == before


def test_inspect_table_and_errors(capsys):
    assert main(["inspect", str(SAMPLES / "digits_mlp.onnx")]) == 0
    out = capsys.readouterr().out
    assert "prunable group" in out.splitlines()[1] and "MACs" in out
    assert main(["inspect", str(SAMPLES / "missing.onnx")]) == 3
    assert capsys.readouterr().err.startswith("rewrite: error:")
