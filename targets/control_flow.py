"""Import ONNX graphs holding `If` control nodes into Relax so that the control flow survives the build.

TVM's ONNX importer turns an `If` into `relax.If` but emits no dataflow block for the whole function (so
nothing fuses), and it binds values computed inside a branch (nested `If`s, converter temporaries) in the
enclosing scope, where they run whatever the condition says. Here every straight-line run of ONNX nodes
becomes its own Relax function, imported by `from_onnx` as a flat graph (one dataflow block, so it fuses
like any model), and `main` calls them in order, with a real `relax.If` for each ONNX `If`, its branches
built the same way. A branch that is not taken is never entered, so its functions never run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from rewriter.dominators import node_inputs
from rewriter.graph import node_subgraphs


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "If" for node in model.graph.node)


def _initializers(graph: onnx.GraphProto, table: dict[str, onnx.TensorProto]) -> None:
    """Every initializer, at any nesting depth, by name (names are unique across scopes)."""
    for tensor in graph.initializer:
        table[tensor.name] = tensor
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            _initializers(sub, table)


def _reading(node: onnx.NodeProto, renamed: dict[str, str]) -> onnx.NodeProto:
    """A copy of a (subgraph-free) node whose inputs follow `renamed`."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [renamed.get(name, name) for name in copy.input]
    return copy


def _type_outputs(model: onnx.ModelProto) -> None:
    """Give the segment's outputs their inferred types (the importer wants typed outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info}
    for i, output in enumerate(model.graph.output):
        if output.name in known:
            model.graph.output[i].CopyFrom(known[output.name])


class _Importer:
    """Builds `main` with a BlockBuilder: segment calls and relax.If, scope by scope."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from tvm import relax

        self.model = model
        self.bb = relax.BlockBuilder()
        self.inits: dict[str, onnx.TensorProto] = {}
        _initializers(model.graph, self.inits)
        self.count = 0

    def scope(self, nodes: list[onnx.NodeProto], env: dict[str, Any], outputs: list[str]) -> None:
        """Emit `nodes` into the current block; `env` maps ONNX names to Relax values and grows."""
        runs: list[list[onnx.NodeProto]] = [[]]
        for node in nodes:
            if node.op_type == "If":
                runs.extend([[node], []])
            else:
                runs[-1].append(node)
        for index, run in enumerate(runs):
            if not run:
                continue
            later = set(outputs).union(*(node_inputs(n) for r in runs[index + 1:] for n in r))
            if run[0].op_type == "If":
                self._if(run[0], env)
            else:
                self._segment(run, env, later)

    def _segment(self, nodes: list[onnx.NodeProto], env: dict[str, Any], later: set[str]) -> None:
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        produced = [o for n in nodes for o in n.output if o]
        reads = sorted(set().union(*(node_inputs(n) for n in nodes)) - set(produced))
        inputs = [name for name in reads if name not in self.inits]
        outputs = [name for name in produced if name in later]
        if not outputs:
            return
        # Parameters get plain names: ONNX names such as "/stem/Relu_output_0" end up in kernel signatures.
        params = {name: f"x{i}" for i, name in enumerate(inputs)}
        nodes = [_reading(node, params) for node in nodes]
        shapes = {params[n]: [int(d) for d in env[n].ty.shape.values] for n in inputs}
        dtypes = {params[n]: str(env[n].ty.dtype) for n in inputs}
        graph = helper.make_graph(
            nodes, f"segment{self.count}",
            [helper.make_tensor_value_info(p, helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[p])), shapes[p])
             for p in params.values()],
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            [self.inits[n] for n in reads if n in self.inits],
        )
        part = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        part.ir_version = self.model.ir_version
        _type_outputs(part)
        callee = self._add_module(from_onnx(part, shape_dict=shapes, dtype_dict=dtypes), f"segment{self.count}")
        self.count += 1
        result = self.bb.emit(relax.Call(callee, [env[n] for n in inputs]))
        if len(outputs) == 1:
            env[outputs[0]] = result
        else:
            for i, name in enumerate(outputs):
                env[name] = self.bb.emit(relax.TupleGetItem(result, i))

    def _add_module(self, mod: Any, name: str) -> Any:
        """Add an imported segment's `main` as `name`, with the PrimFuncs the importer made for it
        (renamed where another segment already has a different one of the same name)."""
        from tvm.relax.expr_functor import PyExprMutator, mutator

        renamed = {}
        for gv, func in mod.functions_items():
            if gv.name_hint != "main":
                renamed[gv.name_hint] = self.bb.add_func(func, gv.name_hint)

        @mutator
        class _Swap(PyExprMutator):
            def visit_global_var_(self, op):  # noqa: ANN001 - TVM's visitor signature
                return renamed.get(op.name_hint, op)

        func = mod["main"].without_attr("global_symbol")
        if renamed:
            func = _Swap().visit_expr(func)
        return self.bb.add_func(func, name)

    def _if(self, node: onnx.NodeProto, env: dict[str, Any]) -> None:
        from tvm import relax

        branches = {a.name: a.g for a in node.attribute}
        then_seq = self._branch(branches["then_branch"], env)
        else_seq = self._branch(branches["else_branch"], env)
        result = self.bb.emit(relax.If(env[node.input[0]], then_seq, else_seq))
        if len(node.output) == 1:
            env[node.output[0]] = result
        else:
            for i, name in enumerate(node.output):
                env[name] = self.bb.emit(relax.TupleGetItem(result, i))

    def _branch(self, graph: onnx.GraphProto, env: dict[str, Any]) -> Any:
        from tvm import relax

        inner = dict(env)  # a branch sees the enclosing scope; its own names stay inside
        outputs = [o.name for o in graph.output]
        self.bb._begin_binding_block()  # noqa: SLF001 - BlockBuilder has no public nested-block API
        self.scope(list(graph.node), inner, outputs)
        values = [inner[name] for name in outputs]
        body = values[0] if len(values) == 1 else self.bb.emit(relax.Tuple(values))
        block = self.bb._end_block()  # noqa: SLF001
        return relax.SeqExpr([block], body)


def import_with_control_flow(model: onnx.ModelProto, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> Any:
    """ONNX model with If nodes -> Relax IRModule: `main` (control flow) calling fused-able segment functions."""
    from tvm import relax

    importer = _Importer(model)
    params = [relax.Var(name, relax.TensorType(shape, dtypes[name])) for name, shape in shapes.items()]
    env: dict[str, Any] = {p.name: p for p in params}
    outputs = [o.name for o in model.graph.output]
    with importer.bb.function("main", params):
        importer.scope(list(model.graph.node), env, outputs)
        values = [env[name] for name in outputs]
        importer.bb.emit_func_output(values[0] if len(values) == 1 else relax.Tuple(values))
    mod = importer.bb.get()
    mod["main"] = mod["main"].with_attr("num_input", len(params))
    return mod
