"""babyllama/precision.py: the precision/compile fast path follows the CPU's features (bf16 only where the CPU
multiplies bf16 in hardware), and the 'auto' settings resolve from the probed features."""
import pytest

from babyllama import precision

AMX_XEON = dict(capability="AVX512", amx=True, avx512_bf16=True)
ZEN4 = dict(capability="AVX512", amx=False, avx512_bf16=True)
AVX2_ONLY = dict(capability="AVX2", amx=False, avx512_bf16=False)
ZEN4_FORCED_AVX2 = dict(capability="AVX2", amx=False, avx512_bf16=True)  # ATEN_CPU_CAPABILITY=avx2


def test_cpu_fast_path_takes_bf16_only_where_the_cpu_multiplies_bf16_in_hardware():
    assert precision.cpu_fast_path(AMX_XEON)[:2] == ("bfloat16", True)
    assert precision.cpu_fast_path(ZEN4)[:2] == ("bfloat16", True)
    assert precision.cpu_fast_path(ZEN4, fixed_shapes=False)[:2] == ("bfloat16", False)  # padded batches: no compile
    assert precision.cpu_fast_path(AVX2_ONLY)[:2] == ("float32", False)
    assert precision.cpu_fast_path(ZEN4_FORCED_AVX2)[:2] == ("float32", False)  # the kernels in use decide
    assert "no bf16 matrix units" in precision.cpu_fast_path(AVX2_ONLY)[2]


@pytest.mark.parametrize("features, dtype, compiled", [(AMX_XEON, "bfloat16", True), (AVX2_ONLY, "float32", False)])
def test_auto_settings_follow_the_probed_features(monkeypatch, features, dtype, compiled):
    monkeypatch.setattr(precision, "cpu_features", lambda: features)
    assert precision.resolve_dtype("auto", "cpu") == dtype
    assert precision.resolve_compile("auto", "cpu", dtype) is compiled
    assert precision.resolve_compile("auto", "cpu", dtype, fixed_shapes=False) is False
    assert precision.resolve_compile("auto", "cpu", "float16") is False  # another precision: off the measured path
    assert precision.resolve_dtype("float32", "cpu") == "float32"
    assert precision.resolve_compile(True, "cpu", "float32") is True
    assert precision.describe_path("cpu", dtype, compiled).endswith(precision.cpu_fast_path(features)[2])
    with pytest.raises(SystemExit, match="compile must be True, False or 'auto'"):
        precision.resolve_compile("yes", "cpu", dtype)
