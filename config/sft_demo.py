# The CPU demo's chat fine-tuning (make demo): the demo pretrain checkpoint on the poetry SFT set that
# sft_data_process.py --demo_poetry builds, boxed by iterations (the same model on every machine).
# 32 conversations per iteration however many processes share it (torchrun: N dividing 32); they are short
# (about 60 tokens), so padded batches stay small
import os

out_dir = "out/demo/sft"
init_ckpt = "out/demo/pretrain/ckpt.pt"
train_data = "out/demo/sft_data/train.jsonl"
val_data = "out/demo/sft_data/val.jsonl"
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 32 // gradient_accumulation_steps
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
# (measured on two pretrained bases: 400 iterations at 1e-3 gave 96.5% and 40% well-formed poems, the greedy
# answers falling into one template or another; 800 at 2e-3 gave 95.5% and 93%)
max_iters = 800
lr_decay_iters = 800
eval_interval = 200
eval_iters = 10
