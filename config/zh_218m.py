# demo-zh's data on a GPU at baby-llama2-chinese's 218M shape with ChatGLM2-6B's tokenizer, layered on
# config/baby_218m.py; the token files as in config/zh_92m.py:
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py config/zh_218m.py
out_dir = "out/zh_218m"
train_data = "out/zh/data_glm/train.bin,out/zh/data_glm_medical/train.bin"
train_weights = "0.9,0.1"
val_data = "out/zh/data_glm/val.bin"
warmup_iters = 50
max_iters = 600  # x 262,144 tokens (16 x 16 x 1024) = 157M tokens
lr_decay_iters = 600
eval_interval = 50
