"""Processes: a training run's set-up as a Run, the model wrapped for DDP or sharded with FSDP2, gradient sync on the
last micro-step only, and all-reduces of logged numbers. The training loops stay in the scripts."""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
import gc
import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from babyllama.configurator import exit_error
from babyllama.precision import (DTYPES, amp_setup, configure_cpu, describe_path, resolve_compile, resolve_device,
                                 resolve_dtype)

# ---- distributed ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Where and how this process trains: set up once by setup_run, read by the loop. ddp: launched by torchrun; rank /
    local_rank / world_size: this process among world_size; device: 'cpu' or 'cuda:N'; device_type: 'cpu' or 'cuda';
    accum: micro-steps per process per iteration; dtype: 'float32' / 'bfloat16' / 'float16'; autocast: the forward-pass
    context; scaler: the GradScaler (enabled for float16 only); compile: the resolved choice; parallel: 'ddp' (whole
    model per process) or 'fsdp' (parameters, gradients, optimizer sharded)."""
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_type: str = "cpu"
    accum: int = 1
    dtype: str = "float32"
    autocast: object = None
    scaler: object = None
    compile: bool = False
    parallel: str = "ddp"

    @property
    def master(self):
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def setup_ddp(device="auto", parallel="ddp"):
    """Initialise torch.distributed under torchrun (RANK set): nccl on GPUs, gloo on CPUs. parallel='fsdp' without
    torchrun starts a group of one (fully_shard needs a group; checkpoints are then the same sharded format). Returns a
    Run with ddp, rank, local_rank, world_size and the device."""
    device = resolve_device(device)
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        exit_error(f"error: device must be one of auto, cpu, cuda, cuda:N, not {device!r}")
    if int(os.environ.get("RANK", -1)) == -1:
        if parallel != "fsdp":
            return Run(device=device)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return Run(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size, device=device, parallel=parallel)


def free_port():
    """A TCP port nobody listens on now (for a one-process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_run(device, dtype, num_threads, gradient_accumulation_steps, out_dir, compile=False, fixed_shapes=True,
              parallel="ddp"):
    """What every training script sets up before its data and model: DDP, the device and precision (dtype and compile
    may be 'auto': this device's fast path, see cpu_fast_path), CPU threads, the output folder. Returns a Run.
    gradient_accumulation_steps counts the micro-steps of all processes, so must divide by their number. num_threads (0
    = torch's default, all cores) is shared by one machine's processes: 2 processes on 2 cores get 1 thread each.
    parallel: 'ddp' or 'fsdp' (see parallelize; fsdp refuses float16, whose loss scaler FSDP's sharded gradients do not
    support). A configuration error ends the run with one line from rank 0."""
    if gradient_accumulation_steps < 1 or gradient_accumulation_steps % int(os.environ.get("WORLD_SIZE", "1")):
        exit_error(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be a positive multiple "
                   f"of the {os.environ.get('WORLD_SIZE', '1')} processes (it counts the micro-steps of all of them "
                   f"together); set --gradient_accumulation_steps=N accordingly (the batch per process stays "
                   f"batch_size)")
    if dtype not in DTYPES:
        exit_error(f"error: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if parallel not in PARALLEL:
        exit_error(f"error: parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}")
    if parallel == "fsdp" and dtype == "float16":
        exit_error("error: parallel='fsdp' trains in bfloat16 or float32; float16 needs a loss scaler for sharded "
                   "gradients that this project does not ship: use --dtype=bfloat16")
    run = setup_ddp(device, parallel)
    run.device_type = "cuda" if run.device.startswith("cuda") else "cpu"
    run.accum = gradient_accumulation_steps // run.world_size
    if run.device_type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (num_threads or torch.get_num_threads()) // local) if run.ddp else num_threads
        if threads:
            torch.set_num_threads(threads)
        configure_cpu()
    else:
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls: fp32 range, ~8x the throughput
        torch.backends.cudnn.allow_tf32 = True
    run.dtype = resolve_dtype(dtype, run.device_type)
    run.compile = resolve_compile(compile, run.device_type, run.dtype, fixed_shapes)
    run.autocast, run.scaler = amp_setup(run.device_type, run.dtype)
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{run.world_size} process(es) on {run.device} ({parallel}), {torch.get_num_threads()} thread(s) each; "
              f"precision {describe_path(run.device_type, run.dtype, run.compile, fixed_shapes)}")
    return run


def cleanup_ddp(run):
    """Leave the process group at the end of a torchrun run. Delete the DDP wrapper first: with its reducer alive when
    the group goes, gloo aborted about one CPU run in 15 at exit (none in 80 once deleted)."""
    if run.ddp and dist.is_initialized():
        gc.collect()  # the wrapper's reference cycles, so its reducer is really gone
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value, run):
    """The sum of a Python number over all processes."""
    if not run.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.device if run.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.item()


def all_reduce_mean(value, run):
    """The mean of a Python float over all processes (so every process decides on the same number)."""
    return all_reduce_sum(value, run) / run.world_size


def wrap_ddp(module, run):
    """The module under DistributedDataParallel when running under torchrun, else the module itself."""
    if not run.ddp:
        return module
    return DDP(module, device_ids=[run.local_rank] if run.device_type == "cuda" else None)


PARALLEL = ("ddp", "fsdp")


def parallelize(model, run, activation_checkpointing=False, cpu_offload=False, replicas=1, outer=None):
    """Make a Transformer ready to train on this run's processes; returns the module the loop calls.
    - activation_checkpointing: each block recomputes its activations in the backward pass.
    - parallel='ddp': torch.compile (run.compile) of `outer` (a wrapper of the model, e.g. sft's PackedLM; default the
      model), then DDP under torchrun.
    - parallel='fsdp' (FSDP2, fully_shard; Zhao et al. 2023): each block compiled and sharded, then the root (tied
      weights stay one parameter); blocks are gathered one at a time. bfloat16: bf16 parameters in compute, fp32
      gradient reduction. cpu_offload: shards and optimizer work in CPU memory. replicas > 1: HSDP, a (replicas,
      world_size / replicas) mesh: shard within a node, replicate across. Parameters become DTensor shards in place:
      create the optimizer after this."""
    for layer in model.layers:
        layer.checkpointing = activation_checkpointing
    if run.parallel != "fsdp":
        module = outer if outer is not None else model
        return wrap_ddp(torch.compile(module) if run.compile else module, run)
    if cpu_offload and run.device_type != "cuda":
        raise SystemExit("cpu_offload=True moves FSDP's shards from GPU memory to CPU memory; this run is on the CPU "
                         "already: leave it False")
    if run.world_size % replicas:
        raise SystemExit(f"replicas={replicas} must divide the {run.world_size} processes (HSDP shards within "
                         f"world_size / replicas processes)")
    # imported here: FSDP takes half a second to import, and most runs are DDP or one process
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mesh = None
    if replicas > 1:
        mesh = init_device_mesh(run.device_type, (replicas, run.world_size // replicas),
                                mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if run.dtype == "bfloat16" else MixedPrecisionPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.layers:
        if run.compile:
            layer.compile()
        fully_shard(layer, **shard)
    fully_shard(model, **shard)
    # packed rows (sft), generation and scoring call this method rather than forward: it must gather the root too
    register_fsdp_forward_method(model, "_forward_positions")
    return outer if outer is not None else model


def gradient_sync(module, sync):
    """Context for one micro-step's backward: with sync False gradients are not reduced yet (DDP's no_sync; FSDP2's
    set_requires_gradient_sync(False)), so only an iteration's last micro-step communicates."""
    if sync:
        return nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    fsdp = [m for m in ([module] + list(module.children())) if hasattr(m, "set_requires_gradient_sync")]
    if not fsdp:
        return nullcontext()
    return _fsdp_no_sync(fsdp[0])


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
