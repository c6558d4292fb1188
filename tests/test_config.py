"""The run config: strict validation with errors that name the key, and the precedence of sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from graft.configuration import (
    GraftConfig,
    LayerRule,
    describe,
    dump_yaml,
    parse_config,
    read_yaml,
    resolve_config,
    set_key,
)
from graft.errors import ConfigError, GraftError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        if isinstance(v, dict):
            keys |= leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


# ------------------------------------------------------------------------------ defaults and files


def test_defaults_parse():
    for cfg in (parse_config(None), parse_config({}), GraftConfig()):
        assert cfg == GraftConfig()
        assert cfg.model.name == "tf_efficientnet_lite0"
        assert cfg.model.weights == "bundled"
        assert cfg.model.frozen_bn_eval is True
        assert cfg.train.strategy == "two-phase"
        assert cfg.solver.type == "adamw"
        assert cfg.solver.lr_policy == "cosine"
        assert cfg.solver.base_lr == pytest.approx(1e-3)
        assert cfg.data.augment == "auto"  # decided on the validation split (graft.tasks.classify.autotune)
        assert cfg.train.head_lr == "auto"
        assert cfg.model.bn_inference is True
        assert cfg.train.early_stopping is None
        assert cfg.data.img_size is None


def test_yaml_file_loading(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        """
data:
  dir: /images
  img_size: 192
  mean: [0.1, 0.2, 0.3]
model:
  name: test_resnet
  freeze: [backbone.conv1]
  lr_mult:
    - {pattern: "backbone.layer1.*", lr_mult: 0.5, decay_mult: 0}
train:
  strategy: fine-tune
  fine_tune_at: layer3
solver:
  type: sgd
  base_lr: 0.05
  stepvalue: [2, 4]
""",
    )
    cfg = resolve_config(path)
    assert cfg.data.dir == "/images"
    assert cfg.data.img_size == 192
    assert cfg.data.mean == (0.1, 0.2, 0.3)
    assert cfg.model.name == "test_resnet"
    assert cfg.model.freeze == ["backbone.conv1"]
    assert cfg.model.lr_mult == [LayerRule(pattern="backbone.layer1.*", lr_mult=0.5, decay_mult=0.0)]
    assert cfg.train.strategy == "fine-tune"
    assert cfg.train.fine_tune_at == "layer3"
    assert cfg.solver.type == "sgd"
    assert cfg.solver.base_lr == pytest.approx(0.05)
    assert cfg.solver.stepvalue == [2, 4]
    # untouched keys keep their defaults
    assert cfg.solver.momentum == pytest.approx(0.9)
    assert cfg.data.augment == "auto"


def test_empty_yaml_file_is_defaults(tmp_path):
    assert resolve_config(write(tmp_path / "empty.yaml", "")) == GraftConfig()


def test_yaml_file_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        read_yaml(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        resolve_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "solver:\n  base_lr: 0.1\n  seed: 1\n\tbatch_size: 2\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "not valid YAML at line 4, column 1" in msg  # the tab on line 4
    assert "\\t" in msg or "tab" in msg.lower() or "character" in msg


def test_config_error_is_a_graft_error():
    with pytest.raises(GraftError):
        parse_config({"solver": {"base_lrr": 1}})


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["solver"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ unknown keys, types, choices


def test_unknown_key_in_section_names_full_key_and_suggests():
    with pytest.raises(ConfigError) as info:
        parse_config({"solver": {"base_lrr": 0.1}})
    msg = str(info.value)
    assert "'solver.base_lrr'" in msg
    assert "did you mean 'solver.base_lr'" in msg
    allowed = msg.split("allowed here:")[1]
    for key in ("base_lr", "lr_policy", "momentum", "snapshot_prefix", "seed"):
        assert key in allowed


def test_unknown_key_at_top_level():
    with pytest.raises(ConfigError) as info:
        parse_config({"solvr": {"base_lr": 0.1}})
    msg = str(info.value)
    assert "unknown key 'solvr'" in msg
    assert "did you mean 'solver'" in msg
    assert "allowed here: task, data, model, train, solver" in msg


def test_unknown_key_without_close_match_still_lists_allowed():
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"zzzzzz": 1}})
    msg = str(info.value)
    assert "'model.zzzzzz'" in msg
    assert "did you mean" not in msg
    assert "frozen_bn_eval" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as info:
        parse_config({"solver": {"batch_size": "lots"}})
    msg = str(info.value)
    assert "'solver.batch_size'" in msg
    assert "'lots'" in msg


def test_out_of_range_names_key():
    with pytest.raises(ConfigError, match=r"'data\.val_fraction'"):
        parse_config({"data": {"val_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"'solver\.base_lr'"):
        parse_config({"solver": {"base_lr": 0}})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as info:
        parse_config({"solver": {"lr_policy": "cosin"}})
    msg = str(info.value)
    assert "'solver.lr_policy'" in msg
    for policy in ("fixed", "step", "multistep", "cosine", "one-cycle", "plateau"):
        assert f"'{policy}'" in msg


def test_nested_rule_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"lr_mult": [{"pattern": "backbone.*", "lr_mult": -1}]}})
    assert "model.lr_mult.0.lr_mult" in str(info.value)


def test_two_phase_with_no_epochs_is_an_error():
    with pytest.raises(ConfigError, match="nothing to train"):
        parse_config({"train": {"epochs": 0, "fine_tune_epochs": 0}})
    # a single-phase strategy is judged on its own
    assert parse_config({"train": {"strategy": "fine-tune", "epochs": 3, "fine_tune_epochs": 0}}).train.epochs == 3


@pytest.mark.parametrize("prefix", ["a/b", "a\\b", ".hidden", "last", ""])
def test_snapshot_prefix_rejects_non_plain_names(prefix):
    with pytest.raises(ConfigError, match=r"'solver\.snapshot_prefix'"):
        parse_config({"solver": {"snapshot_prefix": prefix}})


def test_snapshot_prefix_accepts_plain_names():
    assert parse_config({"solver": {"snapshot_prefix": "ckpt_v2"}}).solver.snapshot_prefix == "ckpt_v2"


def test_crop_scale_order_validated():
    with pytest.raises(ConfigError, match=r"'data\.crop_scale'"):
        parse_config({"data": {"crop_scale": [0.9, 0.2]}})
    assert parse_config({"data": {"crop_scale": [0.2, 0.9]}}).data.crop_scale == (0.2, 0.9)


# ------------------------------------------------------------------------------ --set overrides


@pytest.mark.parametrize(
    "assignment, section, key, value",
    [
        ("solver.base_lr=0.05", "solver", "base_lr", 0.05),
        ("solver.batch_size=8", "solver", "batch_size", 8),
        ("solver.stepvalue=[2, 5]", "solver", "stepvalue", [2, 5]),
        ("data.img_size=null", "data", "img_size", None),
        ("data.img_size=", "data", "img_size", None),
        ("data.hflip=false", "data", "hflip", False),
        ("model.frozen_bn_eval=true", "model", "frozen_bn_eval", True),
        ("model.name=test_vit", "model", "name", "test_vit"),
        ("model.weights=/tmp/a=b.pt", "model", "weights", "/tmp/a=b.pt"),  # split on the first '='
        ("train.fine_tune_at=-3", "train", "fine_tune_at", -3),
    ],
)
def test_set_key_parses_yaml_values(assignment, section, key, value):
    data: dict = {}
    set_key(data, assignment)
    assert data == {section: {key: value}}
    assert type(data[section][key]) is type(value)


def test_set_key_merges_into_existing_section():
    data = {"solver": {"type": "sgd"}}
    set_key(data, "solver.base_lr=0.2")
    assert data == {"solver": {"type": "sgd", "base_lr": 0.2}}


def test_set_without_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE") as info:
        set_key({}, "solver.base_lr")
    assert "solver.base_lr" in str(info.value)


@pytest.mark.parametrize("assignment", ["base_lr=0.1", "solver.sgd.momentum=0.1", ".base_lr=1", "solver.=1"])
def test_set_needs_section_and_key(assignment):
    with pytest.raises(ConfigError, match="SECTION.KEY") as info:
        set_key({}, assignment)
    assert "data, model, train, solver" in str(info.value)


def test_set_unknown_section_suggests():
    with pytest.raises(ConfigError) as info:
        set_key({}, "solvr.base_lr=0.1")
    msg = str(info.value)
    assert "unknown config section 'solvr'" in msg
    assert "did you mean 'solver'" in msg
    assert "data, model, train, solver" in msg


def test_set_unknown_key_caught_at_resolve():
    with pytest.raises(ConfigError, match=r"'solver\.base_lrr'.*did you mean 'solver\.base_lr'"):
        resolve_config(overrides=["solver.base_lrr=0.1"])


def test_precedence_defaults_file_set_flags(tmp_path):
    path = write(
        tmp_path / "cfg.yaml",
        "solver:\n  base_lr: 0.5\n  seed: 1\n  batch_size: 7\n  momentum: 0.5\nmodel:\n  name: test_resnet\n",
    )
    cfg = resolve_config(
        path,
        overrides=["solver.seed=2", "solver.batch_size=9"],
        flags={"solver.batch_size": 11, "solver.momentum": None, "train.epochs": 4},
    )
    assert cfg.solver.type == "adamw"  # default
    assert cfg.model.name == "test_resnet"  # file
    assert cfg.solver.base_lr == pytest.approx(0.5)  # file
    assert cfg.solver.seed == 2  # --set beats the file
    assert cfg.solver.batch_size == 11  # a flag beats --set
    assert cfg.solver.momentum == pytest.approx(0.5)  # a flag left at None does not override
    assert cfg.train.epochs == 4  # a flag beats the default


def test_later_set_wins():
    cfg = resolve_config(overrides=["solver.seed=3", "solver.seed=5"])
    assert cfg.solver.seed == 5


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "solver:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(path)
    assert str(path) in str(info.value)
    assert "'solver.base_lrr'" in str(info.value)


# ------------------------------------------------------------------------------ reference and round trip


def test_describe_covers_every_leaf_key():
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == leaf_keys(GraftConfig().to_dict())
    assert {"solver.base_lr", "model.lr_mult", "data.crop_scale", "train.fine_tune_at"} <= set(keys)
    defaults = {k: d for k, d, _ in rows}
    assert defaults["solver.base_lr"] == "0.001"
    assert defaults["model.name"] == "tf_efficientnet_lite0"
    assert defaults["model.freeze"] == "[]"
    assert defaults["data.img_size"] == "null"
    # every default as written round-trips through YAML to the actual default
    flat = {}
    for section, values in GraftConfig().to_dict().items():
        if not isinstance(values, dict):  # a top-level key (task)
            flat[section] = values
            continue
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    for key, default, _ in rows:
        assert yaml.safe_load(default) == flat[key], key


def test_round_trip_defaults_and_custom():
    custom = parse_config(
        {
            "data": {"mean": [0.1, 0.2, 0.3], "crop_scale": [0.3, 1.0], "interpolation": "bilinear"},
            "model": {"name": "test_vit", "lr_mult": [{"pattern": "backbone.blocks.0", "lr_mult": 0}], "reinit": ["head"]},
            "train": {"fine_tune_at": "blocks.3", "amp": False},
            "solver": {"type": "sgd", "stepvalue": [1, 3], "max_iter": 100},
        }
    )
    for cfg in (GraftConfig(), custom):
        assert parse_config(cfg.to_dict()) == cfg
        assert parse_config(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert custom != GraftConfig()
    assert custom.train.fine_tune_at == "blocks.3"


def test_validate_assignment():
    cfg = GraftConfig()
    with pytest.raises(ValidationError, match="base_lr"):
        cfg.solver.base_lr = -1.0
    assert cfg.solver.base_lr == pytest.approx(1e-3)


def test_every_example_config_is_valid():
    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        resolve_config(path)  # raises ConfigError naming the key if an example went stale


def test_the_python_api_survives_its_own_imports() -> None:
    """Importing a submodule binds it as an attribute of the package: a submodule named like an
    API function (``graft.config``, ``graft.export``) replaced the function after its first call."""
    import pkgutil

    import graft
    import graft.configuration  # noqa: F401 - what graft.config's first call imports
    import graft.exporting.writer  # noqa: F401

    modules = {m.name for m in pkgutil.iter_modules(graft.__path__)}
    assert not modules & set(graft.__all__), "a submodule is named like an API function"
    first = graft.config(data={"dir": "pets/"}, train={"epochs": 3})
    second = graft.config(data={"dir": "pets/"}, train={"epochs": 4})
    assert (first.train.epochs, second.train.epochs) == (3, 4)
    assert all(callable(getattr(graft, name)) for name in graft.__all__ if name != "__version__")


def test_a_section_given_twice_in_a_config_file_is_an_error(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: the first train section's strategy would be lost."""
    path = write(tmp_path / "twice.yaml", "train:\n  strategy: fine-tune\nsolver:\n  base_lr: 0.01\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"at line 5, column 1: key 'train' appears twice in one mapping \(first at line 1\)"):
        read_yaml(path)


def test_the_readme_config_reference_has_every_key_with_its_default():
    """The README's table is written by hand: a key added to the config without a row fails here."""
    import json

    from graft.configuration import GraftConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    for section, field in GraftConfig.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        if keys is None:
            assert rows.get(section) == field.default, section
            continue
        for key, f in keys.items():
            name = f"{section}.{key}"
            assert name in rows, f"README's config reference has no row for {name}"
            default = f.default if f.default_factory is None else f.default_factory()
            assert rows[name] in (str(default), json.dumps(default)), (name, rows[name], default)
