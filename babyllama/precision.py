"""Precision: the device, its dtype and whether to compile there (the CPU fast path), autocast and the loss scaler."""
from contextlib import nullcontext

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_features():
    """What this CPU offers torch's kernels: ATen's vector capability ('AVX2', 'AVX512', ...; honours
    ATEN_CPU_CAPABILITY), and whether it has AMX tiles or AVX512-BF16, the two hardware paths for bf16 matrices."""
    return dict(capability=torch.backends.cpu.get_cpu_capability(), amx=torch.cpu._is_amx_tile_supported(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported())


def cpu_fast_path(features, fixed_shapes=True):
    """The fastest training precision and compile choice for a CPU with these features (cpu_features()), as measured
    (bench.py config/bench_rival.py, 2 threads, training tokens/s):
    - bf16 matrix units (AMX, or AVX512-BF16 with AVX-512 kernels): bf16 autocast; 1.9x fp32 eager on an AMD EPYC (2.2x
      compiled), ~2.5x on Intel Xeons with AMX.
    - none (AVX2 only): fp32; emulated bf16 is 16x slower.
    compile gained 4-22% per step on CPU but costs tens of seconds of warm-up: chosen only with bf16 units and fixed
    shapes (padded chat batches change shape and recompile). Returns (dtype, compile, reason), reason a log sentence."""
    units = [name for name, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if features.get(key)]
    vector = features.get("capability", "")
    if units and "AVX512" in vector:
        return "bfloat16", fixed_shapes, (f"{' and '.join(units)} multiply bf16 matrices in hardware: bf16 autocast"
                                          + (" + torch.compile" if fixed_shapes else ""))
    why = "no bf16 matrix units" if not units else f"{'/'.join(units)} present but ATen is limited to {vector}"
    return "float32", False, f"{why} ({vector} kernels): bf16 would be emulated, many times slower; fp32"


def resolve_device(device):
    """'auto' = 'cuda' when torch sees a GPU, else 'cpu'; any other device name is returned as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device_type, features=None):
    """'auto' = bf16 on GPUs that support it, else fp16; on CPU, cpu_fast_path's choice (features: cpu_features(),
    probed when None). SystemExit naming the allowed values for anything else."""
    if dtype not in DTYPES:
        raise SystemExit(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return cpu_fast_path(features or cpu_features())[0]


def resolve_compile(compile, device_type, dtype, fixed_shapes=True, features=None):
    """compile = True / False, or 'auto': on GPUs, compile for fixed shapes; on CPU, cpu_fast_path's choice when dtype
    is its dtype, else False (off the measured path). SystemExit for any other value."""
    if isinstance(compile, bool):
        return compile
    if compile != "auto":
        raise SystemExit(f"compile must be True, False or 'auto', not {compile!r}")
    if device_type == "cuda":
        return fixed_shapes
    path_dtype, path_compile, _ = cpu_fast_path(features or cpu_features(), fixed_shapes)
    return path_compile and dtype == path_dtype


def describe_path(device_type, dtype, compile, fixed_shapes=True):
    """One line saying which precision and compile choice a run uses and why (setup_run and bench.py print it)."""
    if device_type != "cpu":
        return f"{dtype}, compile={compile}"
    features = cpu_features()
    path_dtype, path_compile, reason = cpu_fast_path(features, fixed_shapes)
    chosen = "the fast path" if (dtype, compile) == (path_dtype, path_compile) else \
        f"set by the config (the fast path would be {path_dtype}, compile={path_compile})"
    return f"{dtype}, compile={compile}: {chosen}; this CPU: {features['capability']}, {reason}"


def amp_setup(device_type, dtype):
    """The autocast context for forward passes and a GradScaler (enabled for fp16 only: bf16 has fp32's range)."""
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    return autocast, scaler


def configure_cpu():
    """CPU settings every script uses."""
    # subnormal floats make CPU matmuls 2-5x slower a few steps into training; flush them to zero
    torch.set_flush_denormal(True)
