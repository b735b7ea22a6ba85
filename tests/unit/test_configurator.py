"""babyllama/configurator.py: a setting that defaults to 'auto' takes a bool override and nothing else. (Its
command-line errors and --help, as users meet them: tests/scripts/test_pretrain.py and test_sft.py.)"""
import pytest

from babyllama import configurator


def test_an_auto_setting_takes_a_bool_override_and_nothing_else():
    g = {"compile": "auto", "__name__": "x"}
    configurator.apply_overrides(g, ["--compile=False"], verbose=False)
    assert g["compile"] is False
    with pytest.raises(ValueError, match="expected str"):
        configurator.apply_overrides({"compile": "auto"}, ["--compile=3"], verbose=False)


def test_a_string_setting_keeps_digits_and_comma_lists_as_text():
    g = {"ratios": "", "train_weights": "", "name": "x", "__name__": "x"}
    configurator.apply_overrides(g, ["--ratios=1,0.5,2", "--train_weights=0.8", "--name=7"], verbose=False)
    assert g == {"ratios": "1,0.5,2", "train_weights": "0.8", "name": "7", "__name__": "x"}
