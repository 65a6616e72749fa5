"""Configuration: defaults, files, overrides and the checks that name the
offending value."""
import os

import pytest

import layerpar

from layerpar.config import DEFAULTS, MIN_COARSE, ConfigError, parse_override, resolve, to_toml


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
    opts = mgrit_options(resolve(None, ["mgrit.skip=true", "mgrit.microbatches=4"]))
    assert opts["skip"] is True and opts["microbatches"] == 4
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
