# demo-zh's data on a GPU at baby-llama2-chinese's 92M shape, with its tokenizer (ChatGLM2-6B's, 64,794 ids), layered
# on config/baby_92m.py (a config file after another overrides it):
#   make demo-zh                        # data/zh/, out/zh/clean/, out/zh/clean_medical/ (the CPU model is a bonus)
#   python data_process.py --input=out/zh/clean/clean.parquet --tokenizer_model=<chatglm2>/tokenizer.model \
#       --val_fraction=0.02 --out_dir=out/zh/data_glm
#   python data_process.py --input=out/zh/clean_medical/clean.parquet --tokenizer_model=<chatglm2>/tokenizer.model \
#       --val_fraction=0.05 --out_dir=out/zh/data_glm_medical
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_92m.py config/zh_92m.py
out_dir = "out/zh_92m"
train_data = "out/zh/data_glm/train.bin,out/zh/data_glm_medical/train.bin"
train_weights = "0.98,0.02"  # the medical file is 1.4% of the tokens: 2% is ~8 passes over it
# Token budget: with this tokenizer the general text is 26,978,230 training tokens and the medical text 385,806
# (measured), far under the ~20 tokens per parameter a 91.7M model could use, so the run is ~5.7 passes over it:
# 1200 iterations x 131,072 tokens = 157M tokens. babyllama.memory's estimate (bench.py --estimate=True): 5.7 GiB
# peak per process in bf16 with AdamW; 6 x parameters x tokens = ~4 minutes on one H200 at an assumed 40%
# MFU (not measured: no GPU was lent to this project's sessions).
val_data = "out/zh/data_glm/val.bin"
warmup_iters = 100
max_iters = 1200  # x 131,072 tokens (32 x 8 x 512) = 157M tokens
lr_decay_iters = 1200
eval_interval = 100
