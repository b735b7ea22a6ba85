# The CPU demo: a ~8M-parameter model trained for about 10 minutes on 2 cores (make demo).
out_dir = "out/demo/pretrain"
train_data = "out/demo/data/train.bin"
val_data = "out/demo/data/val.bin"
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
max_seq_len = 256
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_iters = 100000  # the wall-clock limit below ends the run
lr_decay_iters = 1200
max_minutes = 10.0
eval_interval = 200
eval_iters = 10
log_interval = 20
num_threads = 2
# bf16 autocast puts the matmuls on the CPU's AMX units where it has them: ~2.5x the fp32 throughput on this
# project's machines (bench.py); compile fuses the element-wise work. Without AMX, plain fp32.
import torch
dtype = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
compile = dtype == "bfloat16"
