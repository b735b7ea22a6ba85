# demo-zh's continued pretraining (make demo-zh): the pretrained model on medical text (an infectious-diseases
# textbook excerpt and Huatuo's medical answers) mixed with the general text it was pretrained on. MedicalGPT's
# maintainers advise keeping most of a domain mix general, so the model keeps its language: 80% general, 20% medical
# of the tokens (pretrain.py's train_weights), whatever the sizes of the two files.
import os

out_dir = "out/zh/medical"
init_ckpt = "out/zh/pretrain/ckpt.pt"
train_data = "out/zh/data/train.bin,out/zh/data_medical/train.bin"
train_weights = "0.8,0.2"
val_data = "out/zh/data_medical/val.bin"  # held-out medical text; eval.py --mode=ppl measures the general text after
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 16 // gradient_accumulation_steps
learning_rate = 1e-3  # a new warm-up and decay from a third of pretraining's peak
min_lr = 1e-4
warmup_iters = 20
max_iters = 300
lr_decay_iters = 300
eval_interval = 100
eval_iters = 20
seed = 1337
compile = False
