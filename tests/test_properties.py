"""Identities that hold for every input, checked on inputs hypothesis draws:
micro-batch sizes, the checkpoint tree codec, and the configuration's TOML
round trip and merge order.  (Layouts and hierarchies for any N and P are in
test_options_properties.py, transfers between any two depths in
test_transfer.py, agreements with any set of failing ranks in
test_layerpar_robust.py, pipeline schedules for any P and M in
test_pipeline.py.)"""
import copy
import io
import math

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerpar.checkpoint.format import digest_tree, read_entry, write_entry
from layerpar.config import DEFAULTS, ConfigError, merge, parse_override, to_toml
from layerpar.engine.pipeline import split_sizes

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


# ---- micro-batch sizes ----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 5000), m=st.integers(1, 200))
def test_split_sizes_are_those_of_tensor_split(batch, m):
    sizes = split_sizes(batch, m)
    assert sum(sizes) == batch and len(sizes) == min(m, batch) and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    if batch <= 400:  # tensor_split itself (cheap for small batches)
        assert sizes == [len(c) for c in torch.arange(batch).tensor_split(min(m, batch))]


# ---- the checkpoint tree codec ---------------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype.is_floating_point:
        t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        if n and draw(st.booleans()):  # special values travel bit for bit
            t[0] = draw(st.sampled_from([math.inf, -math.inf, math.nan, -0.0]))
    elif dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, (n,), generator=g,
                          dtype=torch.int64).to(dtype)
    t = t.reshape(shape)
    if draw(st.booleans()) and t.dim() == 2:
        t = t.t()  # not contiguous
    return t


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62),
                    st.floats(allow_nan=False), st.text(max_size=12))
arrays = st.builds(lambda t: t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy(),
                   tensors())
leaves = st.one_of(scalars, tensors(), arrays)
names = st.text(st.characters(blacklist_characters="/.", blacklist_categories=("Cs",)),
                min_size=1, max_size=8)


def trees():
    return st.recursive(leaves, lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(names, children, max_size=4),
        st.dictionaries(st.integers(-50, 50), children, max_size=4)), max_leaves=12)


def _same(a, b):
    """Equal types, keys and key order, dtypes, shapes and bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and
                (a.numel() == 0 or torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                               b.contiguous().reshape(-1).view(torch.uint8))))
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees())
def test_a_tree_reads_back_bit_for_bit_with_the_same_digest(tree):
    with h5py.File(io.BytesIO(), "w") as f:
        write_entry(f, "entry", tree, "tree")
        back = read_entry(f["entry"], "tree")
    assert _same(tree, back)
    assert digest_tree(back) == digest_tree(tree)


@settings(max_examples=100, deadline=None)
@given(a=trees(), b=trees())
def test_the_digest_tells_trees_apart(a, b):
    # distinct content (types, keys, dtypes, shapes or bits): another digest
    if not _same(a, b):
        assert digest_tree(a) != digest_tree(b)


# ---- the configuration ------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)
kwargs = st.dictionaries(text, st.one_of(st.booleans(), st.integers(-10**6, 10**6),
                                         st.floats(allow_nan=False, allow_infinity=False),
                                         text, st.lists(st.integers(-5, 5), max_size=3)),
                         max_size=3)


def _value_like(default):
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-10**9, 10**9)
    if isinstance(default, float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(default, str):
        return text
    if isinstance(default, list):
        return st.lists(st.integers(0, 50), max_size=4)
    if isinstance(default, dict):
        return kwargs
    raise AssertionError(type(default))


@st.composite
def configs(draw):
    """Any values of the keys' types (the TOML round trip does not check
    ranges: that is ``check``'s job)."""
    config = copy.deepcopy(DEFAULTS)
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            if draw(st.booleans()):
                config[section][key] = draw(_value_like(default))
    return config


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs())
def test_a_configuration_written_as_toml_reads_back_the_same(config):
    read = tomllib.loads(to_toml(config))
    assert merge(copy.deepcopy(DEFAULTS), read, "the written file") == config


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0.001, 10.0), min_size=1, max_size=5),
       other=st.integers(1, 100))
def test_later_overrides_win_and_untouched_keys_keep_their_value(values, other):
    config = copy.deepcopy(DEFAULTS)
    for v in values:
        merge(config, parse_override(f"optim.lr={v!r}"), "--set")
    merge(config, parse_override(f"optim.epochs={other}"), "--set")
    assert config["optim"]["lr"] == values[-1] and config["optim"]["epochs"] == other
    assert {s: {k: v for k, v in d.items() if (s, k) not in
                {("optim", "lr"), ("optim", "epochs")}} for s, d in config.items()} == \
        {s: {k: v for k, v in d.items() if (s, k) not in
             {("optim", "lr"), ("optim", "epochs")}} for s, d in DEFAULTS.items()}


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from(list(DEFAULTS)), key=st.text("abcdefgh_", min_size=1,
                                                           max_size=10))
def test_an_unknown_key_is_refused_naming_it(section, key):
    if key in DEFAULTS[section]:
        return
    with pytest.raises(ConfigError, match=f"unknown key {section}.{key} "):
        merge(copy.deepcopy(DEFAULTS), {section: {key: 1}}, "--set")
