# demo-zh's data on a GPU at baby-llama2-chinese's 92M shape, with its tokenizer (ChatGLM2-6B's, 64,794 ids), layered
# on config/baby_92m.py (a config file after another overrides it):
#   make demo-zh                        # data/zh/, out/zh/clean/, out/zh/clean_medical/ (the CPU model is a bonus)
#   python data_process.py --input=out/zh/clean/clean.parquet --tokenizer_model=<chatglm2>/tokenizer.model \
#       --val_fraction=0.02 --out_dir=out/zh/data_glm
#   python data_process.py --input=out/zh/clean_medical/clean.parquet --tokenizer_model=<chatglm2>/tokenizer.model \
#       --val_fraction=0.05 --out_dir=out/zh/data_glm_medical
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_92m.py config/zh_92m.py
# Token budget: the corpus is small for this shape (see the README's demo-zh section for the token count and the
# memory/throughput estimate), so the run is a few epochs of it with medical text mixed in from the start.
out_dir = "out/zh_92m"
train_data = "out/zh/data_glm/train.bin,out/zh/data_glm_medical/train.bin"
train_weights = "0.9,0.1"
val_data = "out/zh/data_glm/val.bin"
warmup_iters = 100
max_iters = 1200  # x 131,072 tokens (32 x 8 x 512) = 157M tokens
lr_decay_iters = 1200
eval_interval = 100
