# demo-zh's pretraining (make demo-zh): a small Llama 2 on the general modern-Chinese token files (the modern side of
# NiuTrans Classical-Modern's 97 books and People's Daily 1998-01, ~27.7M tokens), boxed by iterations so every
# machine trains the same model. The shape was chosen by validation loss reached per CPU-minute (README, "demo-zh").
# 16 windows of 256 tokens per iteration however many processes share it (torchrun: N dividing 16)
import os

out_dir = "out/zh/pretrain"
train_data = "out/zh/data/train.bin"
val_data = "out/zh/data/val.bin"
dim = 192
n_layers = 4
n_heads = 6
n_kv_heads = 6
max_seq_len = 256  # a news paragraph or a chapter part runs to hundreds of tokens: the context to learn prose
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 16 // gradient_accumulation_steps
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
max_iters = 1400
lr_decay_iters = 1400
eval_interval = 250  # the held-out loss through training
eval_iters = 20
seed = 1337
compile = False  # eager: bit-identical runs on one machine (config/demo_cpu.py says why)
