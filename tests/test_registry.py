"""Registries: unknown names suggest the nearest and list every name; bad options name the option."""

from __future__ import annotations

import pytest
import torch

from mtml.datasets import DATASETS
from mtml.errors import ConfigError, UnknownNameError
from mtml.registry import Registry, check_options
from mtml.weighting import WEIGHTINGS


def _square(x: int, *, power: int = 2, offset: int = 0) -> int:
    """Raise to a power."""
    return x**power + offset


def _anything(**kwargs: int) -> int:
    return len(kwargs)


@pytest.fixture
def reg() -> Registry[int]:
    r: Registry[int] = Registry("widget")
    r.register("square", _square)
    r.register("anything", _anything, help="takes any option")
    r.register("squirrel", _square, help="same thing")
    return r


def test_create_and_listing(reg: Registry[int]) -> None:
    assert reg.create("square", 3) == 9
    assert reg.create("square", 3, power=3, offset=1) == 28
    assert reg.names() == ["anything", "square", "squirrel"]
    assert list(reg) == reg.names() and len(reg) == 3
    assert "square" in reg and "cube" not in reg
    assert reg.describe() == {"anything": "takes any option", "square": "Raise to a power.", "squirrel": "same thing"}


def test_unknown_name_suggests_nearest_and_lists_names(reg: Registry[int]) -> None:
    with pytest.raises(UnknownNameError) as info:
        reg.create("sqaure", 2)
    msg = str(info.value)
    assert "unknown widget 'sqaure'" in msg
    assert "Did you mean 'square'?" in msg
    assert "anything, square, squirrel" in msg
    assert not msg.startswith(("'", '"'))  # not quoted like a KeyError
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)


def test_unknown_name_without_a_near_match(reg: Registry[int]) -> None:
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "anything, square, squirrel" in str(info.value)


def test_duplicate_registration_is_refused(reg: Registry[int]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        reg.register("square", _square)


def test_bad_option_is_config_error_naming_the_option(reg: Registry[int]) -> None:
    with pytest.raises(ConfigError) as info:
        reg.create("square", 2, powr=3)
    msg = str(info.value)
    assert "unknown option 'powr'" in msg and "Did you mean 'power'?" in msg
    assert "widget 'square'" in msg and "power" in msg and "offset" in msg


def test_where_names_the_config_path(reg: Registry[int]) -> None:
    with pytest.raises(ConfigError, match=r"^training\.weighting\.options: unknown option 'bogus'"):
        reg.create("square", 2, where="training.weighting.options", bogus=1)


def test_var_keyword_factories_accept_anything(reg: Registry[int]) -> None:
    assert reg.create("anything", a=1, b=2) == 2


def test_check_options_with_no_parameters() -> None:
    def nothing() -> None:
        return None

    with pytest.raises(ConfigError, match=r"Allowed options: \(none\)"):
        check_options(nothing, {"x": 1}, where="here")


@pytest.mark.parametrize(("registry", "typo", "expected"), [
    (WEIGHTINGS, "uncertainity", "uncertainty"), (WEIGHTINGS, "equall", "equal"),
    (DATASETS, "pengiuns", "penguins"), (DATASETS, "school", "schools"),
])
def test_builtin_registries_suggest(registry: Registry[object], typo: str, expected: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.get(typo)
    assert f"Did you mean '{expected}'?" in str(info.value)
    assert ", ".join(registry.names()) in str(info.value)


def test_builtin_option_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'temprature'.*Did you mean 'temperature'"):
        WEIGHTINGS.create("dwa", ["a", "b"], temprature=1.0)
    with pytest.raises(ConfigError, match=r"unknown option 'num_task'.*Did you mean 'num_tasks'"):
        DATASETS.create("synthetic", num_task=2)


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_task_names_are_not_an_option(name: str) -> None:
    """The task list is passed by mtml, positionally; as an option it would be a TypeError at build time."""
    with pytest.raises(ConfigError) as info:
        WEIGHTINGS.create(name, ["a", "b"], task_names=["c"])
    assert "unknown option 'task_names'" in str(info.value)
    assert "task_names," not in str(info.value).split("Allowed options:")[1]


def test_positional_only_parameters_are_not_options() -> None:
    def f(a: int, /, b: int = 0) -> int:
        return a + b

    with pytest.raises(ConfigError, match=r"unknown option 'a'\. Allowed options: b\."):
        check_options(f, {"a": 1}, where="w")
    check_options(f, {"b": 1}, where="w")


def test_missing_required_keyword_only_options() -> None:
    def needs(x: int, *, path: str, mode: str, level: int = 0) -> str:
        return f"{x}{path}{mode}{level}"

    r: Registry[str] = Registry("thing")
    r.register("needs", needs)
    with pytest.raises(ConfigError, match=r"^here: missing required options 'path', 'mode'\.$"):
        r.create("needs", 1, where="here")
    with pytest.raises(ConfigError, match=r"missing required option 'mode'\.$"):
        r.create("needs", 1, path="p")
    assert r.create("needs", 1, path="p", mode="m") == "1pm0"


def test_option_values_are_checked_against_the_factorys_annotations() -> None:
    from mtml.datasets import DATASETS

    for bad, needle in ((None, "a valid integer"), ("x", "a valid integer"), (3.5, "a valid integer"),
                        ([1], "a valid integer"), ("3", "int, written as such")):
        with pytest.raises(ConfigError, match=rf"data.options: `num_tasks` must be {needle}.*Got "):
            DATASETS.create("synthetic", where="data.options", num_tasks=bad)
    # a value the annotation reads (an int for a float) reaches the factory as that type
    tasks = DATASETS.create("synthetic", where="data.options", num_tasks=2, in_dim=3, latent_dim=1, n_train=4,
                            n_val=4, n_test=4, noise=0)
    assert len(tasks) == 2


def test_a_word_for_a_flag_is_refused() -> None:
    def factory(*, flag: bool = False) -> bool:
        return flag

    registry: Registry[bool] = Registry("thing")
    registry.register("f", factory)
    assert registry.create("f", flag=True) is True
    for bad in ("yes", 1, "true"):
        with pytest.raises(ConfigError, match=r"`flag` must be bool, written as such"):
            registry.create("f", flag=bad)


def test_a_flag_for_a_number_is_refused() -> None:
    # pydantic's lax mode read true as 1.0: ExcessMTL's step_size=true and MoDo's rho=true built with 1.0
    from mtml.weighting import WEIGHTINGS

    for name, key in (("excess_mtl", "step_size"), ("modo", "rho")):
        with pytest.raises(ConfigError, match=rf"`{key}` must be float, written as such.*Got True"):
            WEIGHTINGS.create(name, ["a", "b"], **{key: True})
    def factory(*, k: int = 1, x: float = 0.5) -> float:
        return k * x

    registry: Registry[float] = Registry("thing")
    registry.register("f", factory)
    assert registry.create("f", k=2, x=1) == 2.0
    for bad in ({"k": False}, {"x": True}):
        with pytest.raises(ConfigError, match=r"must be (int|float), written as such"):
            registry.create("f", **bad)


def test_annotations_pydantic_cannot_read_are_left_to_the_factory() -> None:
    def factory(*, model: torch.nn.Module | None = None, k: int = 1) -> int:
        return k

    registry: Registry[int] = Registry("thing")
    registry.register("f", factory)
    assert registry.create("f", model=torch.nn.Linear(1, 1), k=2) == 2
    with pytest.raises(ConfigError, match="`k` must be a valid integer"):
        registry.create("f", k="two")
