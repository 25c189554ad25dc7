"""The joints of the package: one schema per op across backends, shape arguments that stay
symbolic under torch.compile(dynamic=True), and an import graph without circles."""

import ast
import itertools
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import kernels
from kernels import _ops

from .common import backend_param, ops

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "mobilenet", "bench")


def _schema_without_name(op) -> str:
    schema = str(op._schema)
    return schema[schema.index("(") :]


def test_every_backend_has_the_one_schema_of_each_op():
    """Every backend's op of a name has the schema defined once in kernels/_ops.py."""
    assert {"native", "host_programs"} <= set(_ops.OPS)
    if kernels.available_backends("cpu")["triton"] is None:
        assert "triton" in _ops.OPS
    for backend, op_set in _ops.OPS.items():
        for name, schema in _ops.SCHEMAS.items():
            op = getattr(op_set, name)
            if op is None:
                assert name in _ops.OPTIONAL_OPS, (backend, name)
                continue
            assert _schema_without_name(op) == schema, (backend, name)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, modules) -> set[str]:
    """The project modules `path` imports anywhere in its body (function-level imports too: a
    lazy import that dodges a circle is still a circle). `from package import submodule` is an
    edge to the submodule."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def _import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = _import_graph()
    assert "kernels._ops" in graph and "kernels.triton.depthwise" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _fused_sample(conv: str, batch: int):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn((8, 1, 3, 3) if conv == "depthwise" else (12, 8, 1, 1), generator=gen)
    return x, w


@pytest.mark.parametrize("backend, device", [backend_param(b, "cpu") for b in ("torch", "native")])
@pytest.mark.parametrize("op", ["depthwise_conv2d", "pointwise_bn_act", "depthwise_bn_act"])
def test_dynamic_batch_compiles_one_graph(backend, device, op):
    """torch.compile(dynamic=True) over batches 2, 3 and 5: shape arguments are SymInts, so
    nothing specialises on the batch; forward and backward, through the fake kernels."""
    conv = "pointwise" if op == "pointwise_bn_act" else "depthwise"
    channels = 12 if conv == "pointwise" else 8
    bn_w, bn_b = torch.ones(channels), torch.zeros(channels)
    rm, rv = torch.zeros(channels), torch.ones(channels)

    def layer(x, w):
        if op == "depthwise_conv2d":
            return kernels.depthwise_conv2d(x, w, padding=1, backend=backend)
        geometry = {"padding": 1} if conv == "depthwise" else {}
        fn = getattr(kernels, op)
        return fn(x, w, rm, rv, bn_w, bn_b, training=True, backend=backend, **geometry)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    for batch in (2, 3, 5):
        x, w = _fused_sample(conv, batch)
        w.requires_grad_()
        out = compiled(x, w)
        (grad,) = torch.autograd.grad(out.square().sum(), w)
        torch.testing.assert_close(out, layer(x, w), atol=1e-4, rtol=1e-4)
    # One compilation of the frame (a compile may hand the backend an empty graph beside it).
    compile_ids = {str(gm.meta["dynamo_compile_id"]) for gm in counter.graphs}
    assert compile_ids == {"0/0"}, compile_ids


def test_ops_table_has_every_op_of_each_backend():
    native = ops("native")
    assert native.depthwise_conv2d_fwd.name() == "depsep::depthwise_conv2d_fwd"
    assert ops("host_programs").depthwise_conv2d_fwd.name() == "depsep_host::depthwise_conv2d_fwd"
    # The test-only ops stay out of the public namespace.
    public = [name for name in dir(torch.ops.depsep) if "host" in name]
    assert public == [], public
    handles = [op for op_set in _ops.OPS.values() for op in vars(op_set).values() if op]
    assert len({op.name() for op in handles}) == len(handles)
    assert all(a != b for a, b in itertools.combinations(_ops.OPS.values(), 2))
