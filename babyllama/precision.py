"""Precision: the device, its dtype and whether to compile there (the CPU fast path), autocast and the loss scaler."""
from contextlib import nullcontext

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_features():
    """What this CPU offers the kernels torch will run: ATen's vector capability ('AVX2', 'AVX512', ...; it
    honours ATEN_CPU_CAPABILITY, so a machine told to use AVX2 only reports AVX2), and whether the CPU has
    AMX tiles or AVX512-BF16 instructions, the two ways a CPU multiplies bf16 matrices in hardware."""
    return dict(capability=torch.backends.cpu.get_cpu_capability(), amx=torch.cpu._is_amx_tile_supported(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported())


def cpu_fast_path(features, fixed_shapes=True):
    """The fastest training precision and compile choice for a CPU with these features (cpu_features()), by
    what this project measured (bench.py config/bench_rival.py, 2 threads, training tokens/s):
    - bf16 matrix units (AMX, or AVX512-BF16 with AVX-512 kernels in use): bf16 autocast. On an AMD EPYC with
      AVX512-BF16, bf16 ran 1.9x fp32 eager and 2.2x with compile; on Intel Xeons with AMX ~2.5x.
    - none (AVX2 only): fp32. bf16 there has no matrix units and emulates them: 16x slower than fp32 eager.
    compile: on CPU torch.compile gained 4-22% per step (fp32 / bf16) but costs a warm-up of tens of
    seconds, so it is chosen only where it pays most (bf16 units) and only for fixed shapes (pretraining's
    windows; padded chat batches change shape every step and recompile).
    Returns (dtype, compile, reason), reason a sentence for the log."""
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
    """'auto' = bf16 on GPUs that support it, fp16 on older GPUs; on CPU, cpu_fast_path's choice (features:
    cpu_features(), probed when None). Raises SystemExit naming the allowed values for anything else."""
    if dtype not in DTYPES:
        raise SystemExit(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return cpu_fast_path(features or cpu_features())[0]


def resolve_compile(compile, device_type, dtype, fixed_shapes=True, features=None):
    """compile = True / False, or 'auto': on GPUs, compile models trained on fixed shapes; on CPU, what
    cpu_fast_path chooses when dtype (resolved) is its dtype, else False (a run told to use another precision
    is off the measured path). SystemExit for any other value."""
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
    """The autocast context for forward passes and a GradScaler (enabled only for fp16, whose small range
    needs loss scaling; bf16 has fp32's range)."""
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    return autocast, scaler


def configure_cpu():
    """CPU settings every script uses."""
    # subnormal floats make CPU matmuls 2-5x slower a few steps into training; flush them to zero
    torch.set_flush_denormal(True)
