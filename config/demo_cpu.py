# The CPU demo's pretraining (make demo): a 1.9M-parameter Llama 2 on the chinese-poetry token files, boxed by
# iterations, not by wall time, so every machine trains the same model (a slower or busier CPU takes longer;
# tests/scripts/test_pretrain.py checks thread counts change the losses by less than float rounding).
# The shape was chosen by validation loss reached in 150 s on 2 cores with AVX2-only kernels (the slowest CPU
# the demo targets; see the README): of dim x layers 288x6 (seq 256), 384x4, 256x4, 192x4 and 128x4 (seq 128),
# at a learning rate suited to each width, the small ones learn the most per CPU-minute at this budget.
# 16 windows per iteration however many processes share it: torchrun --nproc_per_node=N (N dividing 16) gives
# each process 16/N windows, one micro-step, and the same model as one process
import os

out_dir = "out/demo/pretrain"
train_data = "out/demo/data/train.bin"
val_data = "out/demo/data/val.bin"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 4
max_seq_len = 128  # a poem is ~77 tokens: longer windows cost attention and teach little more
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 16 // gradient_accumulation_steps
learning_rate = 4e-3
min_lr = 4e-4
warmup_iters = 50
max_iters = 1200
lr_decay_iters = 1200
eval_interval = 400
eval_iters = 10
seed = 1337
# dtype 'auto': the fast path of this CPU (bf16 where it multiplies bf16 in hardware, fp32 elsewhere;
# babyllama/precision.py). No torch.compile: its CPU kernels gave losses that differ from run to run in the
# 7th digit from iteration 3 (two quiet runs, same machine), which grows over training into another model;
# eager runs are bit-identical whatever the load; compile saved 35 s of 143 here (bf16 on a 2-core Zen 4)
compile = False
