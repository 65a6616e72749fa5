"""The MPI tag registry (layerpar._tags): every purpose has tags of its own,
within MPI_TAG_UB, for any bound an MPI may have; every point-to-point
message in layerpar takes its tag from the registry (a scan of the
sources); the MGRIT core's tags are the ones the registry records, on the
core's own communicator; and messages of every purpose in flight at once on
one communicator, with the watchdog serving, each reach their receiver.
"""
import ast
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import layerpar
from layerpar import _tags, set_timeout
from layerpar._watchdog import recv, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(layerpar.__file__))
SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                    suppress_health_check=list(HealthCheck))
BOUNDS = [32767, 2**23 - 1, 2**29 - 1, 2**31 - 1]  # the standard's least, UCX, MPICH, ob1


# ---- the allocation ------------------------------------------------------------

@SETTINGS
@given(tag_ub=st.one_of(st.sampled_from(BOUNDS), st.integers(32767, 2**31 - 1)))
def test_ranges_are_disjoint_and_within_the_bound(tag_ub):
    ranges = _tags.ranges(tag_ub)
    assert set(ranges) == set(_tags.FIXED) | set(_tags.INDEXED)
    spans = sorted((r.start, r.stop, name) for name, r in ranges.items())
    assert spans[0][0] >= 0 and spans[-1][1] - 1 <= tag_ub
    for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
        assert stop <= start, f"{a} and {b} overlap"
    for name in _tags.INDEXED:  # thousands of layers or micro-batches at least
        assert len(ranges[name]) == _tags.width(tag_ub) >= 10000


def test_every_tag_lies_in_its_purposes_range():
    ranges = _tags.ranges()
    for name in _tags.FIXED:
        assert _tags.tag(name) in ranges[name]
    last = _tags.width() - 1
    for name in _tags.INDEXED:
        for index in (0, 1, 17, last):
            assert _tags.tag(name, index) in ranges[name]
    assert _tags.tag("pipeline.backward", last) <= MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)


def test_a_tag_out_of_range_or_of_no_purpose_is_a_clear_error():
    width = _tags.width()
    with pytest.raises(ValueError, match=rf"^pipeline.forward index {width} has no MPI tag: "
                                         r"this MPI's MPI_TAG_UB=\d+ leaves room for indices"):
        _tags.tag("pipeline.forward", width)
    with pytest.raises(ValueError, match="pipeline.backward index -1 has no MPI tag"):
        _tags.tag("pipeline.backward", -1)
    with pytest.raises(ValueError, match=r"no fixed MPI tag for 'pipeline.backward' \(it carr"):
        _tags.tag("pipeline.backward")
    with pytest.raises(ValueError, match=r"no indexed MPI tags for 'watchdog.ping' \(a fixed"):
        _tags.tag("watchdog.ping", 3)
    with pytest.raises(ValueError, match="no fixed MPI tag for 'anything'; fixed tags: watchdog"):
        _tags.tag("anything")


# ---- every user takes its tags from the registry ------------------------------

P2P = {"send", "recv", "isend", "irecv", "Send", "Recv", "Isend", "Irecv", "Issend", "Ssend",
       "Bsend", "Rsend", "sendrecv", "Sendrecv", "Iprobe", "iprobe", "Probe", "probe",
       "Mprobe", "Improbe", "Send_init", "Recv_init"}
TAG_KEYWORDS = {"tag", "sendtag", "recvtag"}


def _sources():
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    yield os.path.relpath(path, ROOT), fh.read()


def _wrappers(trees):
    """{function name: index of its ``tag`` parameter among the arguments a
    caller passes}: layerpar's own functions that pass a tag on."""
    out = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args]
                if "tag" in names:
                    skip = 1 if names and names[0] == "self" else 0
                    out[node.name] = names.index("tag") - skip
    return out


class _Scan(ast.NodeVisitor):
    """Tag arguments that do not come from the registry: literals, arithmetic,
    names bound to anything but a registry call (a forwarded parameter
    excepted)."""

    def __init__(self, wrappers):
        self.wrappers, self.bad = wrappers, []
        self.registry = set()   # names bound to layerpar._tags.tag or the module
        self.scopes = [set()]   # names bound to registry tags, per function
        self.params = [set()]

    def visit_ImportFrom(self, node):
        if node.module == "layerpar._tags":
            self.registry |= {a.asname or a.name for a in node.names if a.name == "tag"}
        if node.module == "layerpar":
            self.registry |= {a.asname or a.name for a in node.names if a.name == "_tags"}

    def _registry_call(self, node):
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        return (isinstance(f, ast.Name) and f.id in self.registry) or \
            (isinstance(f, ast.Attribute) and f.attr == "tag" and
             isinstance(f.value, ast.Name) and f.value.id in self.registry)

    def _good(self, node):
        if self._registry_call(node):
            return True
        if isinstance(node, ast.Name):
            return any(node.id in s for s in self.scopes) or node.id in self.params[-1]
        return False

    def _bind(self, target, value):
        if isinstance(target, ast.Name) and self._registry_call(value):
            self.scopes[-1].add(target.id)
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self._bind(t, v)

    def visit_Assign(self, node):
        for target in node.targets:
            self._bind(target, node.value)
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        self.scopes.append(set())
        self.params.append({a.arg for a in node.args.args} & TAG_KEYWORDS)
        # bindings first, so that a use before its line in a loop still counts
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    self._bind(target, sub.value)
        self.generic_visit(node)
        self.scopes.pop()
        self.params.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        for kw in node.keywords:
            if kw.arg in TAG_KEYWORDS and not self._good(kw.value):
                self.bad.append((node.lineno, ast.unparse(kw.value)))
        if name in self.wrappers:
            k = self.wrappers[name]
            if k < len(node.args) and not self._good(node.args[k]):
                self.bad.append((node.lineno, ast.unparse(node.args[k])))
        elif name in P2P and isinstance(f, ast.Attribute):
            # mpi4py's positional tags: send(obj, dest, tag), Isend(buf, dest, tag),
            # recv(buf, source, tag), Iprobe(source, tag)
            k = 1 if name in ("Iprobe", "iprobe", "Probe", "probe", "Mprobe", "Improbe") else 2
            if k < len(node.args) and not self._good(node.args[k]):
                self.bad.append((node.lineno, ast.unparse(node.args[k])))
        self.generic_visit(node)


def test_every_point_to_point_tag_comes_from_the_registry():
    sources = dict(_sources())
    trees = {path: ast.parse(text) for path, text in sources.items()}
    wrappers = _wrappers(trees.values())
    assert {"recv", "sendrecv", "post_recv", "send"} <= set(wrappers)  # the scan sees them
    bad = []
    for path, tree in trees.items():
        scan = _Scan(wrappers)
        scan.visit(tree)
        bad += [f"{path}:{line}: tag {expr}" for line, expr in scan.bad]
        if not path.endswith("_tags.py"):
            bad += [f"{path}: MPI.TAG_UB outside the registry"
                    for _ in re.finditer(r"TAG_UB", sources[path])]
    assert not bad, "tags not from layerpar._tags:\n" + "\n".join(bad)


def test_the_scan_finds_what_it_must_refuse():
    wrappers = {"recv": 2, "post_recv": 1}
    for code in ("comm.isend(x, dest=1, tag=n)", "comm.Send(buf, 1, 7)",
                 "comm.Iprobe(0, TOP - 2)", "recv(comm, 0, n + 1, 'x')",
                 "msgs.post_recv(0, m + i, rows)", "comm.send(x, dest=1, tag=MPI.TAG_UB - 1)"):
        scan = _Scan(wrappers)
        scan.visit(ast.parse(f"def f(comm, n, m, i):\n    {code}\n"))
        assert scan.bad, code
    good = ("from layerpar._tags import tag\n"
            "PING = 0\n"
            "def f(comm, x, tag_arg, i):\n"
            "    t = tag('transfer.restrict')\n"
            "    comm.isend(x, dest=1, tag=t)\n"
            "    recv(comm, 0, tag('pipeline.forward', i), 'x')\n"
            "def g(comm, tag):\n"
            "    comm.Irecv(b, source=0, tag=tag)\n")
    scan = _Scan(wrappers)
    scan.visit(ast.parse(good))
    assert not scan.bad, scan.bad


# ---- the MGRIT core ------------------------------------------------------------------

def test_the_cores_tags_are_the_recorded_ones_on_its_own_communicator():
    src = os.path.join(ROOT, "braid_ext", "src")
    with open(os.path.join(src, "comm.c")) as f:
        comm_c = f.read()
    with open(os.path.join(src, "core.c")) as f:
        core_c = f.read()
    with open(os.path.join(src, "mgrit.h")) as f:
        levels = int(re.search(r"#define MG_MAX_LEVELS (\d+)", f.read()).group(1))
    found = dict(re.findall(r"TAG_(PING|PONG|NOTICE) = (\d+)", comm_c))
    assert {k.lower(): int(v) for k, v in found.items()} == \
        {k: v for k, v in _tags.CORE_TAGS.items() if not k.startswith("sweep")}
    assert _tags.CORE_TAGS["sweep"] == (0, levels)  # a sweep message's tag is its level
    # a header sent apart (app-owned buffers) has its level + MG_MAX_LEVELS
    assert _tags.CORE_TAGS["sweep.header"] == (levels, 2 * levels)
    assert "tag + MG_MAX_LEVELS" in comm_c
    assert min(int(v) for v in found.values()) >= 2 * levels
    # every message of the core goes over core->comm, its own duplicate
    assert "MPI_Comm_dup(comm, &core->comm)" in core_c
    for call in re.findall(r"MPI_(?:I?[sS]end|I?[rR]ecv|Iprobe)\([^;]*;", comm_c):
        assert "core->comm" in call, call


# ---- all at once on one communicator --------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("limit", [0, 20])
def test_messages_of_every_purpose_in_flight_at_once_reach_their_receivers(limit):
    """Every rank sends its right neighbour one message per purpose but the
    watchdog's (and two indices of each indexed one) on one communicator,
    all at once, and receives them in the reverse order, with and without
    the watchdog serving its own tags while it waits: each arrives where
    its tag says, and the watchdog takes none of them."""
    world = MPI.COMM_WORLD
    if world.size == 1:
        pytest.skip("needs two ranks")
    comm = world.Dup()
    set_timeout(comm, limit)
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    keys = [(name, None) for name in _tags.FIXED if not name.startswith("watchdog.")] + \
        [(name, i) for name in _tags.INDEXED for i in (0, 5)]
    outcome = None
    try:
        sends = [comm.isend((comm.rank, name, i, torch.arange(3.0) + k), dest=right,
                            tag=_tags.tag(name, i)) for k, (name, i) in enumerate(keys)]
        got = {}
        for name, i in reversed(keys):
            got[(name, i)] = recv(comm, left, _tags.tag(name, i), f"the {name} message")
        for q in sends:
            wait(comm, q, "a message to the right", right)
        outcome = all(got[(name, i)][:3] == (left, name, i) and
                      torch.equal(got[(name, i)][3], torch.arange(3.0) + k)
                      for k, (name, i) in enumerate(keys))
    except Exception as e:  # noqa: BLE001 - compared below, on every rank
        outcome = f"{type(e).__name__}: {e}"
    finally:
        outcomes = world.allgather(outcome)
        comm.Free()
    assert outcomes == [True] * world.size
