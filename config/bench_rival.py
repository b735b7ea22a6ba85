# The shared config at which baby-llama2-chinese, llama2.c and minimind were measured on a 2-core CPU
# (fp32, 2 threads): ~8.3M parameters. Use with bench.py (or pretrain.py for a real run of this size).
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
vocab_size = 8000
max_seq_len = 256
batch_size = 8
num_threads = 2
dtype = "float32"
gen_tokens = 200
