# baby-llama2-chinese's 92M shape: dim 512, 8 layers, 8 heads, context 512 (vocab from the tokenizer).
# torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_92m.py
out_dir = "out/baby_92m"
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
# with baby-llama2-chinese's 64,793-token vocab and untied embeddings this is 91.7M parameters (its "92M")
tie_embeddings = False
max_seq_len = 512
batch_size = 32
gradient_accumulation_steps = 8  # in total over all GPUs
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
max_iters = 100000
eval_interval = 1000
eval_iters = 50
log_interval = 10
dtype = "auto"  # bf16 where supported
compile = True
