"""Memory: the measured peak of a run (GPU allocator or the CPU resident set) and the estimate before it runs."""
import torch

from model import ffn_hidden_dim


def reset_peak_memory(device_type):
    """Start a peak-memory measurement; returns the baseline in bytes. CPU (Linux): the resident set after resetting the
    kernel's high-water mark (5 to /proc/self/clear_refs); GPU: the allocated bytes after reset_peak_memory_stats."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_memory_rise(device_type, baseline):
    """Bytes the peak rose above reset_peak_memory's baseline since then (CPU: VmHWM - baseline)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return _proc_status_kib("VmHWM") * 1024 - baseline


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def training_memory(args, batch_size, seq_len=None, dtype="float32", device_type="cuda", optimizer="adamw",
                    lora_rank=0, world_size=1, parallel="ddp", activation_checkpointing=False, chunk=512):
    """Bytes per process of one training step as this project runs it, by part: weights, gradients, optimizer state,
    activations kept for backward, the loss chunks, and the peak. args: ModelArgs; batch_size: sequences per micro-step;
    seq_len: default args.max_seq_len; dtype 'float32' or 'bfloat16' (autocast; FSDP: bf16 parameters in compute);
    device_type: 'cpu' attends in fp32 under autocast (Attention.forward), 'cuda' in bf16; optimizer 'adamw' (2 states
    per trainable weight) or 'muon' (1 for the blocks' matrices); lora_rank > 0: LoRA on every block's 7 projections
    (only adapters train); parallel 'ddp' (a whole copy per process; with world_size > 1 gradient buckets as big as the
    gradients, resident from the wrapper's creation) or 'fsdp' (weights, gradients, optimizer state / world_size, plus
    the unsharded root and two blocks in flight); activation_checkpointing: a block keeps its input only. Activations
    per token, from the tensors autograd saves in model.py's ops: an fp32 block keeps 10 dim + 4 hidden + n_heads + 2
    floats (two RMSNorms 3 dim + 1 each: input, normalised, scaled; q, k, v 3 dim; wo's input dim; SwiGLU's gate, silu,
    up, product 4 hidden; softmax statistics n_heads); under bf16 autocast 44 dim + 8 hidden + 4 n_heads + 8 bytes on
    CPU (norms fp32, each projection's input cast to bf16 apiece, attention fp32), 36 dim + ... on GPU (attention bf16);
    outside the blocks the final norm, the loss's fp32 gradient of h and the token ids; the fused loss keeps the output
    weight's gradient (vocab x dim fp32) from the forward. Peak = weights + optimizer (+ DDP's buckets) + the larger of
    (activations + loss chunks + autocast's bf16 weight copies) and the gradients. It leaves out the CUDA context,
    allocator caching and framework buffers, hence bench.py --measure=True. Returns a dict of bytes (floats): weights,
    gradients (with DDP's buckets), optimizer, activations, loss_chunks, peak; and the counts params and trainable."""
    T = seq_len or args.max_seq_len
    D, L, V, nh = args.dim, args.n_layers, args.vocab_size, args.n_heads
    H = ffn_hidden_dim(args)
    kv = (args.n_kv_heads or nh) * (D // nh)
    block = 2 * D + D * D * 2 + D * kv * 2 + 3 * D * H  # norms, wq wo, wk wv, w1 w2 w3
    root = V * D * (1 if args.tie_embeddings else 2) + D
    n_params = L * block + root
    shapes = [(D, D), (D, kv), (D, kv), (D, D), (D, H), (D, H), (H, D)]  # wq wk wv wo w1 w3 w2: (in, out)
    lora = L * lora_rank * sum(i + o for i, o in shapes)  # A (r x in) and B (out x r) per projection
    trainable = lora if lora_rank else n_params
    muon = L * (block - 2 * D) if optimizer == "muon" and not lora_rank else 0
    states = 2 * (trainable - muon) + muon  # AdamW: exp_avg, exp_avg_sq; Muon: momentum
    bf16 = dtype == "bfloat16"
    shards = world_size if parallel == "fsdp" else 1
    weights = 4 * (n_params + lora) / shards
    if parallel == "fsdp" and world_size > 1:  # gathered for compute: the root all along, two blocks in flight
        weights += (2 if bf16 else 4) * (root + 2 * block)
    grads = 4 * trainable / shards
    if parallel == "fsdp" and world_size > 1:
        grads += 4 * (root + block) if not lora_rank else 0  # unsharded until reduce-scattered
    buckets = 4 * trainable if parallel == "ddp" and world_size > 1 else 0  # DDP's, allocated with the wrapper
    opt = 4 * states / shards
    if bf16:
        per_block = 44 * D + 8 * H + 4 * nh + 8 - (8 * D if device_type == "cuda" else 0)
    else:
        per_block = 4 * (10 * D + 4 * H + nh + 2)
    per_block += 4 * 7 * lora_rank * (1 if lora_rank else 0)  # each adapter's A x
    tokens = batch_size * T
    outside = 4 * (3 * D + 1) + 8
    kept = L * 4 * D + per_block if activation_checkpointing else L * per_block  # (+ one block recomputed)
    activations = tokens * (kept + outside) + 4 * V * D
    if bf16 and parallel != "fsdp":
        activations += 2 * (L * (block - 2 * D) + V * D)  # autocast's bf16 copies of the matrices
    loss_chunks = 2 * min(chunk, tokens) * V * 4  # a chunk's logits and their softmax / gradient
    total = weights + opt + buckets + max(activations + loss_chunks, grads)
    return dict(params=n_params, trainable=trainable, weights=weights, gradients=grads + buckets, optimizer=opt,
                activations=activations, loss_chunks=loss_chunks, peak=total)
