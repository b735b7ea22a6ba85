# demo-zh's chat fine-tuning (make demo-zh): the medical-pretrained model on config/zh_sft_data.py's conversations,
# boxed by iterations. Packed rows (several conversations per 256-token row, a block-diagonal mask) waste no compute
# on padding; 16 rows per iteration however many processes share it (torchrun: N dividing 16)
import os

out_dir = "out/zh/sft"
init_ckpt = "out/zh/medical/ckpt.pt"
train_data = "out/zh/sft_data/train.jsonl"
val_data = "out/zh/sft_data/val.jsonl"
pack = True
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 16 // gradient_accumulation_steps
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
max_iters = 1600
lr_decay_iters = 1600
eval_interval = 400
eval_iters = 0
compile = False
