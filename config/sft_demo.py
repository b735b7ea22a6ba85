# The CPU demo's chat fine-tuning (make demo): the demo pretrain checkpoint on the poetry SFT set that
# sft_data_process.py --demo_poetry builds, for a few minutes on 2 cores.
out_dir = "out/demo/sft"
init_ckpt = "out/demo/pretrain/ckpt.pt"
train_data = "out/demo/sft_data/train.jsonl"
val_data = "out/demo/sft_data/val.jsonl"
batch_size = 32  # the demo's conversations are short (about 60 tokens): padded batches stay small
gradient_accumulation_steps = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 20
max_iters = 600
lr_decay_iters = 600
eval_interval = 100
eval_iters = 10
log_interval = 20
max_minutes = 4.0
num_threads = 2
# bf16 autocast on CPUs with AMX, as in config/demo_cpu.py (no compile: padded batches change shape)
import torch
dtype = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
