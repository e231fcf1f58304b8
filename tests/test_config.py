import pytest

from fedrpc.config import ConfigError, load_config


def test_defaults_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  seed: 3\ndata:\n  synthetic:\n    users: 50\n")
    cfg = load_config(p, ["data.synthetic.signal=0.25", "eval.ks=[5, 10]", "run.out_dir=x"])
    assert cfg.run.seed == 3
    assert cfg.data.synthetic.users == 50
    assert cfg.data.synthetic.signal == 0.25
    assert cfg.eval.ks == [5, 10]
    assert cfg.run.out_dir == "x"


@pytest.mark.parametrize("override, message", [
    ("data.bogus=1", "data.bogus: unknown key; allowed: cold_item_share, format"),
    ("nosection.key=1", "nosection: unknown key"),
    ("run.seed=abc", "run.seed: must be an integer"),
    ("run.seed=1.5", "run.seed: must be an integer"),
    ("eval.ks=10", "eval.ks: must be a list of int"),
    ("eval.ks=[]", "eval.ks: must be a non-empty list"),
    ("eval.ks=[0]", "eval.ks: must be a non-empty list of positive integers"),
    ("data.format=csv", "data.format: must be one of 'synthetic', 'movielens'"),
    ("data.synthetic.signal=1.5", "data.synthetic.signal: must be in [0, 1]"),
    ("run.progress=maybe", "run.progress: must be true or false"),
    ("data.format=movielens", "data.path: required for format 'movielens'"),
    ("run.seed", "expected section.key=value"),
    ("data.synthetic=3", "data.synthetic: must be a mapping"),
    ("gfmfr.max_ratio=-1", "gfmfr.max_ratio: must be >= 0"),
    ("gfmfr.max_ratio=1e-9x", "gfmfr.max_ratio: must be a number"),
    ("gfmfr.max_ratio=nan", "gfmfr.max_ratio: must be a number"),
    ("gfmfr.content_prior=1.5", "gfmfr.content_prior: must be in [0, 1]"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_numbers_parse_as_users_write_them(tmp_path):
    # YAML 1.1 reads 1e-9 (no dot) as a string; a number field takes it as a number
    cfg = load_config(None, ["gfmfr.max_ratio=1e-9", "fed.lr=2E+1", "fed.lr_item=1_000"])
    assert cfg.gfmfr.max_ratio == 1e-9 and cfg.fed.lr == 20.0 and cfg.fed.lr_item == 1000.0
    p = tmp_path / "c.yaml"
    p.write_text("gfmfr:\n  fusion_lr: 5e-4\n")
    assert load_config(p).gfmfr.fusion_lr == 5e-4
    # 0 switches distillation off; a string field keeps its text
    assert load_config(None, ["gfmfr.max_ratio=0"]).gfmfr.max_ratio == 0.0
    assert load_config(None, ["run.out_dir=1e-9"]).run.out_dir == "1e-9"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nothing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_shipped_configs_load():
    from conftest import REPO
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_readme_lists_every_key_with_its_current_default():
    from pathlib import Path

    from fedrpc.config import config_reference
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_reference() in readme, \
        "README's Configuration table is stale: paste `fedrpc config reference` into it"


@pytest.mark.parametrize("backbone, expected", [
    ("fedrap", {"lr": 5.0, "lr_item": 64.0, "lr_private_item": 0.5}),
    ("fedrap_mlp", {"lr": 0.05, "lr_item": 16.0, "lr_private_item": 0.5}),
    ("fedavgmf", {"lr": 5.0, "lr_item": 64.0, "lr_private_item": 0.5}),
])
def test_empty_learning_rates_take_the_backbones_and_set_ones_win(backbone, expected):
    from fedrpc.strategy import learning_rates
    assert learning_rates(load_config(None, [f"fed.backbone={backbone}"])) == expected
    set_ = load_config(None, [f"fed.backbone={backbone}", "fed.lr=0.2"])
    assert learning_rates(set_) == {**expected, "lr": 0.2}
    with pytest.raises(ConfigError, match="fed.lr_item: must be > 0"):
        load_config(None, ["fed.lr_item=0"])
