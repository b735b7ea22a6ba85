# demo-zh's preference tuning (make demo-zh): DPO of the SFT model on mismatched-reply pairs built from its own
# training conversations (doctor answers and translations: the right reply against another question's;
# dpo_data_process.py --mismatched) and on the real Chinese preference pairs of MedicalGPT and LLaMA-Factory
import os

out_dir = "out/zh/dpo"
init_ckpt = "out/zh/sft/ckpt.pt"
train_data = "out/zh/dpo_data/train.jsonl,data/zh/dpo_zh_500.jsonl,data/zh/dpo_zh_demo.json"
val_data = "out/zh/dpo_data/val.jsonl"
loss_type = "sigmoid"
beta = 0.1
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 4 // gradient_accumulation_steps
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
max_iters = 400
eval_interval = 200
sft_weight = 1.0  # DPO plus the chosen reply's NLL (RPO), as config/dpo_demo.py: keeps the replies well-formed
