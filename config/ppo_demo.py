# PPO on the demo's SFT model with the form rules as the reward (the same requests and samples per iteration as
# config/grpo_demo.py: 32 replies), the value model starting from the demo's reward model (reward_model.py).
# python ppo.py config/ppo_demo.py
out_dir = "out/demo/ppo"
init_ckpt = "out/demo/sft/ckpt.pt"
reward = "poetry"
value_ckpt = "out/demo/reward/best.pt"
train_prompts = "out/demo/sft_data/train.jsonl"
val_prompts = "out/demo/sft_data/eval_questions.jsonl"
n_val = 200
prompts_per_iter = 32
minibatch_size = 16
ppo_epochs = 2
max_new_tokens = 64
learning_rate = 3e-4
value_learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 5
max_iters = 150
eval_interval = 25
kl_coef = 0.05
