# GRPO on the demo's SFT model: held-out requests "写一首五言绝句，题为《X》" scored by the form rules
# (babyllama/poetry_rewards.py). python grpo.py config/grpo_demo.py
out_dir = "out/demo/grpo"
init_ckpt = "out/demo/sft/ckpt.pt"
train_prompts = "out/demo/sft_data/train.jsonl"
val_prompts = "out/demo/sft_data/eval_questions.jsonl"
n_val = 200
group_size = 8
prompts_per_iter = 4
max_new_tokens = 64
learning_rate = 3e-4  # the 1.8M demo model takes a large step size (its SFT ran at 2e-3)
min_lr = 3e-5
warmup_iters = 5
max_iters = 150
eval_interval = 25
beta = 0.04
