"""Fuzzed config files: whatever YAML a user (or anyone) hands graft, ``resolve_config`` gives a
config or a ConfigError naming the file, in bounded time and memory; Python tags build nothing;
anchors, aliases and merge keys read exactly as the values written out."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from fuzzing import FUZZ, assert_named, attempt
from hypothesis import example, given, settings
from hypothesis import strategies as st

from graft.configuration import (
    YAML_MAX_VALUES,
    GraftConfig,
    parse_config,
    read_yaml,
    resolve_config,
)
from graft.errors import ConfigError


def _flow(value) -> str:
    """One value as YAML flow text (as a user would write it)."""
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20).removesuffix("\n...\n").strip()


def _load(text: str | bytes):
    """resolve_config of ``text`` written to a config file, and that file's path (removed again)."""
    with tempfile.TemporaryDirectory(prefix="graft-fuzz-") as d:
        path = Path(d) / "fuzz.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return attempt(resolve_config, path), str(path)


# --- pieces of YAML, good and bad -------------------------------------------------------------------

SECTIONS = ["data", "model", "train", "solver", "expand", "detect", "task", "nonsense", "<<", "? [a]", "1", "~"]
KEYS = ["dir", "img_size", "mean", "name", "freeze", "lr_mult", "epochs", "strategy", "seed", "base_lr", "stepvalue", "batch_size", "keep_snapshots", "level_sizes", "x", "<<"]
scalars = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from([
        "0", "-1", "1" * 5000, "0x" + "f" * 5000, "0o7", "1_000", "1:30:00", ".nan", ".inf", "-.inf", "1e400", "1.5", "1e-3",
        "2001-12-14", "2001-13-45", "2001-02-29", "yes", "no", "on", "null", "~", "''", '"\\ud800"', '"\\0"', '"\\x41"',
        "!!binary aGVsbG8=", "!!binary '%%%'", "!!str 3", "!!int x", "!!float y", "!!bool maybe", "!!null 1", "!!set {a, b}",
        "!!omap [a: 1, b: 2]", "!!omap 3", "!!timestamp x", "!!python/object/apply:os.getcwd []", "!!python/name:os.system",
        "!!python/tuple [1, 2]", "!python/anything x", "!<tag:example.com,2000:x> 1", "&a 1", "*a", "*undefined", "|\n    text",
        ">-\n    folded", "'unterminated", "[1, 2", "{a: 1", "- x", "a: b: c", "\t3", "%YAML 1.1", "---", "...",
    ]),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda s: _flow(s)),
)


@st.composite
def values(draw, depth: int = 0):
    kind = draw(st.integers(0, 5 if depth < 3 else 1))
    if kind <= 1:
        return draw(scalars)
    if kind == 2:
        return "[" + ", ".join(draw(st.lists(values(depth + 1), max_size=4))) + "]"
    if kind == 3:
        n = draw(st.integers(1, 400))  # deeper nesting is slow to parse; the @example of 5000 covers it
        return "[" * n + "]" * draw(st.sampled_from([n, n - 1, 0]))  # deep nesting, closed or not
    if kind == 4:
        return "{" + ", ".join(f"{draw(st.sampled_from(KEYS))}: {draw(values(depth + 1))}" for _ in range(draw(st.integers(0, 3)))) + "}"
    return "&" + draw(st.sampled_from(["a", "b"])) + " " + draw(values(depth + 1))


@st.composite
def yaml_documents(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(SECTIONS))
        if draw(st.booleans()):
            lines.append(f"{section}: {draw(values())}")
        else:
            lines.append(f"{section}:")
            lines += [f"  {draw(st.sampled_from(KEYS))}: {draw(values())}" for _ in range(draw(st.integers(0, 3)))]
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n---\nmore: 1\n", "\n\t\n"]))


def _bomb(depth: int, width: int) -> str:
    """Nested aliases: ``width ** depth`` values from a file of a few hundred bytes."""
    anchors = "".join(f"    - &b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]\n" for i in range(1, depth + 1))
    return f"model:\n  name: &b0 lol\n  reinit:\n{anchors}  freeze: [*b{depth}]\n"


# --- properties ------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=120)
@given(yaml_documents())
@example("model: &m\n  freeze: *m\n")  # an alias inside its own anchor
@example("model:\n  freeze: " + "[" * 1000 + "]" * 1000 + "\n")  # RecursionError before the fix
@example("? [a, b]\n: 1\n")  # an unhashable key: TypeError in the duplicate-key check before the fix
@example("solver:\n  seed: " + "1" * 5000 + "\n")  # int() past Python's digit limit: ValueError before the fix
@example("solver:\n  seed: 2001-13-45\n")  # a date PyYAML cannot build: ValueError before the fix
def test_any_yaml_gives_a_config_or_a_config_error_naming_the_file(text: str) -> None:
    outcome, path = _load(text)
    assert isinstance(outcome, (GraftConfig, ConfigError)), repr(outcome)
    assert_named(outcome, path)


@settings(FUZZ, max_examples=30)
@given(st.binary(max_size=64).map(lambda b: b"model:\n  name: " + b + b"\n"))
@example(b"model:\n  name: \xff\xfe\n")  # UnicodeDecodeError before the fix
def test_bytes_that_are_not_utf8_are_a_config_error_naming_the_file(data: bytes) -> None:
    outcome, path = _load(data)
    assert isinstance(outcome, (GraftConfig, ConfigError)), repr(outcome)
    assert_named(outcome, path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(outcome, ConfigError) and "is not UTF-8 text" in str(outcome)


@settings(FUZZ, max_examples=20)
@given(
    tag=st.sampled_from(["!!python/object/apply:os.mkdir", "!!python/object/new:os.mkdir", "!!python/object/apply:builtins.open", "!!python/object/apply:pathlib.Path.mkdir"]),
    section=st.sampled_from(["model", "solver", "data"]),
    nested=st.booleans(),
)
def test_python_tags_are_refused_by_name_and_build_nothing(tag: str, section: str, nested: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="graft-fuzz-") as d:
        marker, path = Path(d) / "made-by-yaml", Path(d) / "fuzz.yaml"
        args = f"[{_flow(str(marker))}, w]" if "open" in tag else f"[{_flow(str(marker))}]"
        value = f"{tag} {args}"
        path.write_text(f"{section}:\n  name: {{x: [{value}]}}\n" if nested else f"{section}: {value}\n")
        with pytest.raises(ConfigError) as info:
            read_yaml(path)
        assert str(path) in str(info.value) and "python/object" in str(info.value)
        assert not marker.exists()


@settings(FUZZ, max_examples=30)
@given(depth=st.integers(1, 9), width=st.integers(2, 9))
@example(depth=9, width=9)  # a billion laughs: gigabytes of error message before the fix
def test_alias_bombs_are_refused_by_name_before_anything_expands_them(depth: int, width: int) -> None:
    outcome, path = _load(_bomb(depth, width))
    assert isinstance(outcome, ConfigError)
    assert_named(outcome, path)
    if width**depth > YAML_MAX_VALUES:
        assert "anchors and aliases expand to more than" in str(outcome)


# --- round trip: anchors, aliases and merge keys read as the values written out -------------------------------

patterns = st.text(st.characters(codec="utf-8", categories=("L", "N"), include_characters="._*-"), min_size=1, max_size=12)
mults = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


@settings(FUZZ, max_examples=50)
@given(
    seed=st.integers(1, 2**63),
    freeze=st.lists(patterns, max_size=4),
    rules=st.lists(st.tuples(patterns, mults, mults), min_size=1, max_size=4),
    aliased=st.booleans(),
)
def test_anchors_aliases_and_merge_keys_read_exactly_as_written_out(seed: int, freeze: list[str], rules: list, aliased: bool) -> None:
    rule_dicts = [{"pattern": p, "lr_mult": lr, "decay_mult": decay} for p, lr, decay in rules]
    first = rule_dicts[0]
    # The same config twice: with anchors, aliases and merge keys (the later rules take the first
    # rule's multipliers by '<<: *first' and give only a pattern), and with every value written out.
    merged = [first] + [{**first, "pattern": r["pattern"]} for r in rule_dicts[1:]]
    plain = {"solver": {"seed": seed, "stepsize": seed}, "model": {"freeze": freeze, "reinit": freeze, "lr_mult": merged}}
    if aliased:
        text = (
            f"solver:\n  seed: &seed {_flow(seed)}\n  stepsize: *seed\n"
            f"model:\n  freeze: &patterns {_flow(freeze)}\n  reinit: *patterns\n"
            f"  lr_mult:\n    - &first {_flow(first)}\n"
            + "".join(f"    - <<: *first\n      pattern: {_flow(r['pattern'])}\n" for r in rule_dicts[1:])
        )
    else:
        text = yaml.safe_dump(plain, allow_unicode=True)
    outcome, _ = _load(text)
    assert outcome == parse_config(plain), outcome
    assert outcome.model.lr_mult[-1].lr_mult == first["lr_mult"] and outcome.solver.stepsize == seed


def test_a_key_given_twice_beside_a_merge_key_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("solver: &s {seed: 1}\ntrain:\n  epochs: 2\nsolver:\n  <<: *s\n")
    with pytest.raises(ConfigError, match="key 'solver' appears twice"):
        read_yaml(path)
