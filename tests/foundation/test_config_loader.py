"""The YAML + key=value config loader: strict keys, types, nested validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_dgrpo.config import ConfigError, dump_yaml, from_dict, load_config, parse_overrides


@dataclass
class Inner:
    size: int = 2
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"

    def validate(self) -> None:
        if self.size % 2:
            raise ValueError(f"inner.size must be even, got {self.size}")


@dataclass
class Outer:
    name: str = "run"
    enabled: bool = True
    seed: Optional[int] = None
    lengths: list[int] = field(default_factory=lambda: [1024])
    inner: Inner = field(default_factory=Inner)
    checked: list[str] = field(default_factory=list)

    def validate(self) -> None:
        self.checked.append("outer")


def test_yaml_and_overrides_build_typed_nested_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ninner:\n  size: 4\n  mode: b\nlengths: [1024, 4096]\n")
    config = load_config(Outer, path, ["inner.ratio=2", "seed=7", "enabled=false"])
    assert config.name == "demo" and config.seed == 7 and config.enabled is False
    assert config.inner == Inner(size=4, ratio=2.0, mode="b")
    assert isinstance(config.inner.ratio, float)
    assert config.lengths == [1024, 4096]
    assert config.checked == ["outer"]


def test_round_trip_through_yaml(tmp_path):
    config = from_dict(Outer, {"name": "x", "inner": {"size": 6}})
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(config))
    again = load_config(Outer, path)
    assert again.inner.size == 6 and again.name == "x"


@pytest.mark.parametrize("data, message", [
    ({"nme": "x"}, "unknown config key(s) nme"),
    ({"inner": {"sise": 2}}, "unknown config key(s) inner.sise"),
    ({"inner": {"size": "big"}}, "inner.size: expected an integer"),
    ({"inner": {"size": True}}, "inner.size: expected an integer"),
    ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of ['a', 'b']"),
    ({"enabled": "yes"}, "enabled: expected true/false"),
    ({"lengths": [1, "x"]}, "lengths[1]: expected an integer"),
    ({"inner": {"size": 3}}, "inner.size must be even"),
])
def test_bad_config_is_rejected_with_the_key_named(data, message):
    with pytest.raises(ValueError) as info:
        from_dict(Outer, data)
    assert message in str(info.value)


def test_unknown_key_message_lists_known_keys():
    with pytest.raises(ConfigError, match="known keys of Inner: mode, ratio, size"):
        from_dict(Outer, {"inner": {"bogus": 1}})


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null"]) == {
        "a": {"b": 1, "c": ["x", "y"]}, "d": None}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["a=1", "a.b=2"])


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it.
    assert from_dict(Outer, parse_overrides(["inner.ratio=1e-3"])).inner.ratio == 1e-3
    with pytest.raises(ConfigError, match="inner.ratio: expected a number"):
        from_dict(Outer, {"inner": {"ratio": "fast"}})


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, path)
