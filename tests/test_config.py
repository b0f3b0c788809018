"""Constraints declared on config fields: every kind refuses exactly the values outside
it, the message names the field as the caller spells it (``--flag`` on the command line,
the argument from Python), and a nested config is checked and offered as prefixed options."""

from dataclasses import dataclass

import pytest

from pyro_vae.config import check_fields, config_from_dict, describe_bounds, nested, option
from pyro_vae.errors import ConfigError


@dataclass
class Inner:
    width: int = option(4, "a width", at_least=1)


@dataclass
class Ranges:
    count: int = option(1, "at least 1", at_least=1)
    rate: float = option(0.1, "positive", above=0)
    share: float = option(0.5, "in (0, 1)", above=0, below=1)
    decay: float = option(1.0, "in (0, 1]", above=0, at_most=1)
    seed: int = option(0, "from 0 to 9", at_least=0, at_most=9)
    weight: float = option(0.0, "non-negative", at_least=0)
    cap: float | None = option(None, "optional, at most 5", at_most=5)
    below: float = option(0.0, "less than 2", below=2)
    kind: str = option("a", "a choice", ("a", "b"))
    inner: Inner = nested(Inner, "the inner part", formerly={"inner_width": "width"})


# (field, a value on the edge that passes, one just outside that is refused, the words)
EDGES = [
    ("count", 1, 0, "at least 1"),
    ("rate", 1e-12, 0.0, "positive"),
    ("share", 0.999, 1.0, "in (0, 1)"),
    ("share", 0.001, 0.0, "in (0, 1)"),
    ("decay", 1.0, 1.0001, "in (0, 1]"),
    ("decay", 1e-9, 0.0, "in (0, 1]"),
    ("seed", 9, 10, "from 0 to 9"),
    ("seed", 0, -1, "from 0 to 9"),
    ("weight", 0.0, -1e-9, "non-negative"),
    ("cap", 5.0, 5.5, "at most 5"),
    ("below", 1.99, 2.0, "less than 2"),
]


@pytest.mark.parametrize("name,inside,outside,words", EDGES)
def test_each_bound_refuses_exactly_the_values_outside_it(name, inside, outside, words):
    check_fields(Ranges(**{name: inside}))
    with pytest.raises(ConfigError) as refused:
        check_fields(Ranges(**{name: outside}))
    assert str(refused.value) == f"{name} must be {words}, got {outside!r}"
    assert refused.value.cli_message() == f"--{name} must be {words}, got {outside!r}"


def test_nan_and_none():
    check_fields(Ranges(cap=None))  # an optional field left out passes
    with pytest.raises(ConfigError, match="^rate must be positive, got nan"):
        check_fields(Ranges(rate=float("nan")))


def test_choices_are_checked_with_the_rest():
    with pytest.raises(ConfigError) as refused:
        check_fields(Ranges(kind="c"))
    assert str(refused.value) == "unknown kind 'c'; choose one of a, b"
    assert refused.value.cli_message() == "unknown --kind 'c'; choose one of a, b"


def test_a_nested_field_is_named_by_its_path():
    with pytest.raises(ConfigError) as refused:
        check_fields(Ranges(inner=Inner(width=0)))
    assert str(refused.value) == "inner.width must be at least 1, got 0"
    assert refused.value.cli_message() == "--inner-width must be at least 1, got 0"


def test_words_for_every_combination():
    assert describe_bounds({"above": 2}) == "greater than 2"
    assert describe_bounds({"at_least": 0, "below": 1}) == "in [0, 1)"
    assert describe_bounds({}) == "any number"


def test_nested_configs_load_from_dicts_old_and_new():
    assert config_from_dict(Ranges, {"inner": {"width": 3}}).inner == Inner(3)
    assert config_from_dict(Ranges, {"inner_width": 7}).inner == Inner(7)  # the flat key it replaced
    assert config_from_dict(Ranges, {}).inner == Inner()
    with pytest.raises(ConfigError, match="width must be of type int"):
        config_from_dict(Ranges, {"inner": {"width": "wide"}})


def test_the_cli_offers_and_checks_a_nested_m1_option(tmp_path):
    from test_cli import FAST, assert_clean_error, invoke

    help_text = invoke("fit", "m1m2", "--help").output
    assert "--m1-z-dim" in help_text and "--m1-likelihood" in help_text and "--m1-m1" not in help_text
    out = tmp_path / "r"
    assert_clean_error(invoke("fit", "m1m2", "--dataset", tmp_path / "nothing.npy", "--m1-z-dim", 0, "--run-dir", out,
                              *FAST), "--m1-z-dim must be at least 1, got 0")
    assert not out.exists()
    from pyro_vae import TrainConfig, fit

    with pytest.raises(ConfigError, match=r"^m1\.z_dim must be at least 1, got 0"):
        fit("m1m2", {"m1": {"z_dim": 0}}, TrainConfig(dataset=str(tmp_path / "nothing.npy")), out)
