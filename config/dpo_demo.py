# The CPU demo's preference tuning (make dpo): DPO of the demo SFT checkpoint on the poetry preference set
# that dpo_data_process.py --demo_poetry builds, for a few minutes on 2 cores.
out_dir = "out/demo/dpo"
init_ckpt = "out/demo/sft/ckpt.pt"
train_data = "out/demo/dpo_data/train.jsonl"
val_data = "out/demo/dpo_data/val.jsonl"
loss_type = "sigmoid"
beta = 0.1
batch_size = 4  # pairs: 8 sequences of about 55 tokens per forward pass
gradient_accumulation_steps = 1
learning_rate = 1e-4  # far above the 5e-7 of 7B models: a tiny model and a few dozen steps
min_lr = 1e-5
warmup_iters = 5
max_iters = 80
eval_interval = 40
log_interval = 1  # every step: the metrics are the point
max_minutes = 4.0
num_threads = 2
