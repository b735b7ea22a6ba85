# The CPU demo's preference tuning (make demo): DPO of the demo SFT checkpoint on the poetry preference set
# that dpo_data_process.py --demo_poetry builds, boxed by iterations (the same model on every machine).
# 4 pairs (8 sequences of about 55 tokens) per iteration however many processes share it (torchrun: N dividing 4)
import os

out_dir = "out/demo/dpo"
init_ckpt = "out/demo/sft/ckpt.pt"
train_data = "out/demo/dpo_data/train.jsonl"
val_data = "out/demo/dpo_data/val.jsonl"
loss_type = "sigmoid"
beta = 0.1
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 4 // gradient_accumulation_steps
learning_rate = 1e-4  # far above the 5e-7 of 7B models: a tiny model and a few dozen steps
min_lr = 1e-5
warmup_iters = 5
max_iters = 80
eval_interval = 40
# DPO plus the NLL of the chosen reply (RPO: Pang et al. 2024): without it DPO on this pair set lengthened the
# replies (poems finished 97.5% -> 69%, well-formed 94.5% -> 59% after 80 steps); with it 100% and 95%
sft_weight = 1.0
