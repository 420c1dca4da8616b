"""GenerationConfig holds the limits every front end relies on (server, pipeline, chat, web UI, agent)."""
import pytest

from puyu.config import MIN_TEMPERATURE, ConfigError, GenerationConfig


def test_temperature_below_the_floor_is_greedy():
    assert GenerationConfig(do_sample=True, temperature=5e-324).greedy
    assert GenerationConfig(do_sample=True, temperature=MIN_TEMPERATURE / 2).greedy
    assert not GenerationConfig(do_sample=True, temperature=MIN_TEMPERATURE).greedy


@pytest.mark.parametrize("value", [5e-324, 0.001, 101.0, 0])
def test_repetition_penalty_out_of_range_names_the_field(value):
    with pytest.raises(ConfigError, match=r"repetition_penalty: must be in \[0.01, 100\]"):
        GenerationConfig(repetition_penalty=value)


@pytest.mark.parametrize("value", [0.01, 1.0, 100])
def test_repetition_penalty_in_range(value):
    assert GenerationConfig(repetition_penalty=value).repetition_penalty == value
