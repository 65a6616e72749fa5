"""The type stubs braid_ext/_core.pyi describe the compiled module as it is:
the same public names, members, parameters and defaults."""
import ast
import inspect
from pathlib import Path

import pytest
from mpi4py import MPI

import braid_ext
from braid_ext import _core
from braid_ext.examples.dahlquist import Dahlquist

STUB = Path(braid_ext.__file__).with_name("_core.pyi")


def stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def public(names):
    return {n for n in names if not n.startswith("_")}


def stub_classes():
    return {node.name: node for node in stub_tree().body if isinstance(node, ast.ClassDef)}


def stub_functions(body):
    return {node.name: node for node in body if isinstance(node, ast.FunctionDef)}


def members(cls_node):
    out = set(stub_functions(cls_node.body))
    out |= {t.target.id for t in cls_node.body
            if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)}
    return out


def parameters(fn_node):
    """[(name, kind, default)] of a stub function; default is the literal
    value, or ... for none given."""
    a = fn_node.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults):
        out.append((arg.arg, "positional", ast.literal_eval(d) if d is not None else None))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "keyword", ast.literal_eval(d) if d is not None else None))
    return out


def test_stub_names_are_the_module_names():
    tree = stub_tree()
    stub_names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    runtime = {n for n in public(dir(_core))
               if not inspect.ismodule(getattr(_core, n))}  # MPI, math are imports
    assert public(stub_names) == runtime
    # braid_ext's other names come from its pure-Python modules
    from braid_ext import options
    assert set(braid_ext.__all__) - {"NumpyApp"} - set(dir(options)) <= runtime


@pytest.mark.parametrize("name", ["Solver", "StepStatus", "AccessStatus", "Layout"])
def test_stub_members_are_the_class_members(name):
    cls = getattr(_core, name)
    assert public(members(stub_classes()[name])) == public(dir(cls))


@pytest.mark.parametrize("cls,method", [
    ("Solver", "solve"), ("Solver", "close"), ("Solver", "local_range"),
    ("Solver", "level_size"), ("Solver", "is_stored"), ("Solver", "get"), ("Solver", "stats"),
    ("Solver", "layout"), ("Layout", "block"), ("Layout", "layers"), ("Layout", "owner"),
    ("MGRITError", "__init__"), ("NonFiniteResidualError", "__init__"), (None, "check_app"),
    (None, "hierarchy"),
])
def test_stub_signatures_match(cls, method):
    if cls is None:
        node = stub_functions(stub_tree().body)[method]
        runtime = inspect.signature(getattr(_core, method))
    else:
        node = stub_functions(stub_classes()[cls].body)[method]
        runtime = inspect.signature(getattr(getattr(_core, cls), method))
    stub = [(n, d) for n, _, d in parameters(node)]
    real = [(p.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in runtime.parameters.values()]
    # the stub writes unspelled defaults as ...; compare names, and defaults where given
    assert [n for n, _ in stub] == [n for n, _ in real]
    for (name, d_stub), (_, d_real) in zip(stub, real):
        if d_stub is not Ellipsis:
            assert d_stub == d_real, name
        else:
            assert d_real is not None, f"{name}: the stub gives a default the code lacks"


def test_stub_solver_options_are_the_real_ones():
    """Solver.__init__ cannot be introspected: pass every keyword option the
    stub names with the stub's default, and compare with solver.options."""
    init = stub_functions(stub_classes()["Solver"].body)["__init__"]
    params = parameters(init)
    assert [n for n, k, _ in params if k == "positional"] == \
        ["self", "app", "comm", "t_start", "t_stop", "nsteps"]
    defaults = {n: d for n, k, d in params if k == "keyword"}
    with _core.Solver(Dahlquist(-1.0), MPI.COMM_SELF, 0.0, 1.0, 8, **defaults) as solver:
        assert solver.options == defaults
    with _core.Solver(Dahlquist(-1.0), MPI.COMM_SELF, 0.0, 1.0, 8) as solver:
        assert solver.options == defaults  # the stub's defaults are the real ones
    from braid_ext.options import DEFAULTS
    assert DEFAULTS == defaults
