"""Configuration: defaults, files, overrides and the checks that name the
offending value."""
import copy
import glob
import os
import re

import pytest

import layerpar

from layerpar.config import (DEFAULTS, MIN_COARSE, ConfigError, check, effective, merge,
                             parse_override, resolve, to_toml)


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = resolve()
    assert config == DEFAULTS
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert resolve(str(path)) == config


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr = 0.5\n[model]\nnlayers = 12\n')
    config = resolve(str(path), ["optim.lr=0.25", 'mgrit.mode="serial"', "model.T=3"])
    assert config["optim"]["lr"] == 0.25
    assert config["model"]["nlayers"] == 12
    assert config["mgrit"]["mode"] == "serial"
    assert config["model"]["T"] == 3.0 and isinstance(config["model"]["T"], float)
    assert parse_override("mgrit.mode=serial") == {"mgrit": {"mode": "serial"}}


@pytest.mark.parametrize("override,named", [
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ('data.name="imagenet"', "data.name"),
    ("mgrit.cfactor=1", "mgrit.cfactor"),
    ('mgrit.relax="FC"', "mgrit.relax"),
    ('mgrit.cycle="W"', "mgrit.cycle"),
    ("mgrit.microbatches=0", "mgrit.microbatches"),
    ("mgrit.microbatches=2.5", "mgrit.microbatches"),
    ('mgrit.schedule="interleaved"', "mgrit.schedule"),
    ("model.nlayers=0", "model.nlayers"),
    ('optim.name="rmsprop"', "optim.name"),
    ("data.batch_size=0", "data.batch_size"),
    ('optim.lr="fast"', "optim.lr"),
    ("optim.learning_rate=0.1", "optim.learning_rate"),
    ("solver.levels=2", "solver"),
    ("lr=0.1", "section.key=value"),
    ('data.name="mnist"', "data.root"),
    ('optim.line_search="wolfe"', "optim.line_search"),
    ('optim.lbfgs_curvature="powell"', "optim.lbfgs_curvature"),
    ("optim.lbfgs_curvature=1", "optim.lbfgs_curvature"),
    ("optim.lbfgs_c1=0.0", "optim.lbfgs_c1"),
    ("optim.lbfgs_c1=1.0", "optim.lbfgs_c1"),
    ('optim.lbfgs_c1="half"', "optim.lbfgs_c1"),
    ("optim.master_weights=1", "optim.master_weights"),
    ('model.bias="none"', "model.bias"),
    ('model.kind="conv"', "model.bias"),
    ("model.init_scale=-1e-3", "model.init_scale"),
])
def test_invalid_values_are_named(override, named):
    base = ['model.bias="scalar"'] if override == 'model.kind="conv"' else []
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve(None, base + [override])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(bad))


def test_mgrit_options_reach_the_network():
    from layerpar.training import mgrit_options
    opts = mgrit_options(resolve(None, ["mgrit.skip=true", "mgrit.cfactor=2"]))
    assert opts["skip"] is True and opts["cfactor"] == 2 and opts["microbatches"] == 1
    serial = mgrit_options(resolve(None, ['mgrit.mode="serial"', "mgrit.microbatches=4",
                                          'mgrit.schedule="1f1b"']))
    assert serial == {"max_levels": 1, "microbatches": 4, "schedule": "1f1b"}


def test_paper_peaks_configuration():
    path = os.path.join(os.path.dirname(layerpar.__file__), "configs", "peaks-paper.toml")
    c = resolve(path)
    assert (c["model"]["nlayers"], c["model"]["width"], c["model"]["T"]) == (30, 8, 1.0)
    assert (c["model"]["bias"], c["model"]["init_scale"]) == ("scalar", 1e-3)
    assert (c["optim"]["name"], c["optim"]["schedule"], c["optim"]["tikhonov"]) == \
        ("lbfgs", "constant", 1e-7)
    assert c["optim"]["tikhonov_ends"] is True
    assert c["data"]["normalize"] is False  # raw inputs, as the paper's code reads them
    assert c["optim"]["lbfgs_curvature"] == "skip"  # the default
    assert c["optim"]["lbfgs_c1"] == 1e-4  # the default


# ---- keys that do not apply, values that cannot work ---------------------------------

@pytest.mark.parametrize("overrides,named", [
    (["mgrit.microbatches=4"], "mgrit.microbatches"),              # layer-parallel
    (['mgrit.mode="one-shot"', "mgrit.microbatches=2"], "mgrit.microbatches"),
    (['mgrit.schedule="1f1b"'], "mgrit.schedule"),
    (["multilevel.levels=3"], "multilevel.levels"),                # method "none"
    (["multilevel.factor=4"], "multilevel.factor"),
    (['multilevel.prolong="linear"'], "multilevel.prolong"),
    (["multilevel.reuse=true"], "multilevel.reuse"),
    (["multilevel.coarse_steps=3"], "multilevel.coarse_steps"),
    (["multilevel.epochs_per_level=[2, 3]"], "multilevel.epochs_per_level"),
    (['multilevel.method="mgopt"', "multilevel.target_accuracy=0.9"],
     "multilevel.target_accuracy"),                                # nested only
    (['multilevel.method="mgopt"', "multilevel.epochs_per_level=2"],
     "multilevel.epochs_per_level"),
    (['multilevel.method="nested"', "multilevel.pre_steps=2"], "multilevel.pre_steps"),
    (['multilevel.method="nested"', 'multilevel.restrict="full-weighting"'],
     "multilevel.restrict"),                                       # MG/OPT only
    (['multilevel.method="nested"', "multilevel.line_search_steps=2"],
     "multilevel.line_search_steps"),
])
def test_a_key_that_does_not_apply_is_refused(overrides, named):
    with pytest.raises(ConfigError) as e:
        resolve(None, overrides)
    text = str(e.value)
    assert text.startswith(named + " = ") and "does not apply" in text and "\n" not in text


@pytest.mark.parametrize("overrides,named,says", [
    (["mgrit.cfactor=64"], "mgrit.cfactor", "use cfactor <= 16"),   # larger than the layers
    (["mgrit.cfactor=17"], "mgrit.cfactor", "no coarse grid"),      # a coarse grid of 1 point
    (['mgrit.mode="one-shot"', "model.nlayers=3", "mgrit.cfactor=2"], "mgrit.cfactor",
     "use more layers"),
    (['mgrit.mode="serial"', "mgrit.microbatches=101"], "mgrit.microbatches", "at most 100"),
    (['mgrit.mode="serial"', "data.batch_size=10", "parallel.data=4",
      "mgrit.microbatches=3"], "mgrit.microbatches", "at most 2"),
    (['optim.line_search="strong-wolfe"', "optim.lbfgs_c1=0.95"], "optim.lbfgs_c1",
     "below its curvature constant 0.9"),
])
def test_a_value_that_cannot_work_is_refused(overrides, named, says):
    with pytest.raises(ConfigError) as e:
        resolve(None, overrides)
    text = str(e.value)
    assert text.startswith(named + " = ") and says in text and "\n" not in text


def test_values_that_work_where_they_apply_are_accepted():
    resolve(None, ['mgrit.mode="serial"', "mgrit.microbatches=100", 'mgrit.schedule="1f1b"'])
    resolve(None, ["mgrit.cfactor=16"])          # 32 layers: a coarse grid of 2 points
    resolve(None, ["model.nlayers=4"])           # the default cfactor: one level, exact
    resolve(None, ['mgrit.mode="serial"', "mgrit.cfactor=64", "mgrit.max_levels=3"])
    resolve(None, ['multilevel.method="nested"', "multilevel.levels=3",
                   "multilevel.target_accuracy=0.9", "multilevel.epochs_per_level=[1, 2, 3]",
                   'multilevel.prolong="linear"', "multilevel.reuse=true"])
    resolve(None, ['multilevel.method="mgopt"', "multilevel.pre_steps=2",
                   'multilevel.restrict="full-weighting"', "multilevel.line_search_steps=2"])


@pytest.mark.parametrize("sets", [
    [], ['mgrit.mode="serial"', "mgrit.microbatches=4", 'mgrit.schedule="1f1b"'],
    ['mgrit.mode="one-shot"', 'optim.name="lbfgs"'],
    ['multilevel.method="nested"', "multilevel.epochs_per_level=[1, 2]"],
    ['multilevel.method="mgopt"', "multilevel.levels=3", "multilevel.coarse_steps=3"],
])
def test_a_configuration_written_out_in_full_loads_again(tmp_path, sets):
    """Every key written, the defaults included (a run's config.toml, a
    checkpoint's stored configuration): it loads as a file and as the
    stored base of a resumed run, and so does its effective form."""
    config = resolve(None, sets)
    path = tmp_path / "config.toml"
    for written in (config, effective(config)):
        path.write_text(to_toml(written))
        assert resolve(str(path)) == written
        stored = {s: dict(v) for s, v in written.items()}
        assert check(merge(copy.deepcopy(DEFAULTS), stored, "checkpoint")) == written


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    os.path.dirname(layerpar.__file__), "configs", "*.toml"))))
def test_the_shipped_configurations_load(path):
    config = resolve(path)
    assert resolve(None, [], base=config) == config


# ---- the effective configuration -----------------------------------------------------

def test_effective_configuration_shows_the_values_used():
    from layerpar.data import DEFAULT_VAL_FRACTION
    config = resolve()
    shown = effective(config)
    assert config["mgrit"]["fwd_iters"] == 0 and config["data"]["val_fraction"] == -1.0
    g, d = shown["mgrit"], shown["data"]
    assert (g["fwd_iters"], g["bwd_iters"]) == (2, 1)
    assert d["val_fraction"] == DEFAULT_VAL_FRACTION["peaks"] == 1 / 6
    one_shot = effective(resolve(None, ['mgrit.mode="one-shot"', "mgrit.bwd_iters=3",
                                        'data.name="digits"']))
    assert (one_shot["mgrit"]["fwd_iters"], one_shot["mgrit"]["bwd_iters"]) == (1, 3)
    assert one_shot["data"]["val_fraction"] == 0.2
    given = effective(resolve(None, ["data.val_fraction=0.25", "mgrit.fwd_iters=4"]))
    assert (given["data"]["val_fraction"], given["mgrit"]["fwd_iters"]) == (0.25, 4)
    # a validation file: no part of the training file is held out
    files = resolve(None, ['data.name="files"', 'data.path="a.npz"', 'data.val_path="b.npz"'])
    assert effective(files)["data"]["val_fraction"] == -1.0
    text = to_toml(shown)
    assert "fwd_iters = 2" in text and "fwd_iters = 0" not in text
    assert "val_fraction = -1" not in text


# ---- messages --------------------------------------------------------------------------

FLOAT_KEYS = [f"{s}.{k}" for s, v in DEFAULTS.items() for k, d in v.items()
              if isinstance(d, float)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_inf_and_nan(key, value):
    with pytest.raises(ConfigError) as e:
        resolve(None, [f"{key}={value}"])
    assert str(e.value).startswith(f"{key} = ") and "a finite number" in str(e.value)


def test_too_many_levels_are_said_readably():
    with pytest.raises(ConfigError) as e:
        resolve(None, ['multilevel.method="mgopt"', "multilevel.levels=100"])
    text = str(e.value)
    assert not re.search(r"\d{7}", text), text
    assert "2^99" in text and "at most 6 levels" in text
    with pytest.raises(ConfigError, match=r"2\^2 = 4; 6 layers allow at most 2 levels"):
        resolve(None, ['multilevel.method="mgopt"', "model.nlayers=6", "multilevel.levels=3"])
    with pytest.raises(ConfigError, match=r"allow at most 1 level with"):
        resolve(None, ['multilevel.method="nested"', "model.nlayers=7"])


@pytest.mark.parametrize("override,reason", [
    ('mgrit.relax="FCFC"',
     "expected 'F', 'FCF', 'FCFCF', ... (F-relaxation followed by CF sweeps)"),
    ("mgrit.max_levels=33", "must be an integer in [1, 32]"),
    ("mgrit.cfactor=1", "the coarsening factor must be an integer >= 2"),
    ('mgrit.cycle="W"', "must be 'V' or 'F'"),
])
def test_solver_keys_are_checked_as_the_solver_checks_them(override, reason):
    """The configuration's MGRIT keys that are Solver options are refused
    for the solver's own reason (braid_ext.options), named as keys."""
    from braid_ext import OptionError, check_options
    key = override.split("=", 1)[0]
    option = key.split(".")[1]
    with pytest.raises(ConfigError) as e:
        resolve(None, [override])
    assert str(e.value).startswith(f"{key} = ") and str(e.value).endswith(reason)
    with pytest.raises(OptionError) as s:
        check_options(64, 1, **{option: parse_override(override)["mgrit"][option]})
    assert s.value.reason == reason


def test_min_coarse_is_the_networks():
    import inspect

    from layerpar.parallel import LayerParallel
    assert inspect.signature(LayerParallel).parameters["min_coarse"].default == MIN_COARSE
