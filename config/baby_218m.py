# baby-llama2-chinese's 218M shape: dim 1024, 12 layers, 8 heads, context 1024 (vocab from the tokenizer).
# torchrun --standalone --nproc_per_node=8 pretrain.py config/baby_218m.py
out_dir = "out/baby_218m"
dim = 1024
n_layers = 12
n_heads = 8
n_kv_heads = 8
# with baby-llama2-chinese's 64,793-token vocab and tied embeddings this is 218.2M parameters
tie_embeddings = True
max_seq_len = 1024
batch_size = 16
gradient_accumulation_steps = 16  # in total over all GPUs
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
max_iters = 100000
eval_interval = 1000
eval_iters = 50
log_interval = 10
dtype = "auto"
compile = True
