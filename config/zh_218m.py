# demo-zh's data on a GPU at baby-llama2-chinese's 218M shape with ChatGLM2-6B's tokenizer, layered on
# config/baby_218m.py; the token files as in config/zh_92m.py:
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py config/zh_218m.py
out_dir = "out/zh_218m"
train_data = "out/zh/data_glm/train.bin,out/zh/data_glm_medical/train.bin"
train_weights = "0.98,0.02"  # the medical file is 1.4% of the tokens: 2% is ~8 passes over it
# Token budget: with this tokenizer the general text is 26,978,230 training tokens and the medical text 385,806
# (measured), far under the ~20 tokens per parameter a 218.2M model could use, so the run is ~5.7 passes over it:
# 600 iterations x 262,144 tokens = 157M tokens. babyllama.memory's estimate (bench.py --estimate=True): 15.8 GiB
# peak per process in bf16 with AdamW; 6 x parameters x tokens = ~10 minutes on one H200 at an assumed 40%
# MFU (not measured: no GPU was lent to this project's sessions).
val_data = "out/zh/data_glm/val.bin"
warmup_iters = 50
max_iters = 600  # x 262,144 tokens (16 x 16 x 1024) = 157M tokens
lr_decay_iters = 600
eval_interval = 50
