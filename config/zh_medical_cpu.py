# demo-zh's continued pretraining (make demo-zh): the pretrained model on the recipe's two domains mixed into the
# general text it was pretrained on: medical text (an infectious-diseases textbook excerpt and Huatuo's medical
# answers) and the training side of the classical -> modern pairs (each pair a short document: instruction, classical
# sentence, translation). MedicalGPT's maintainers advise keeping most of a domain mix general, so the model keeps
# its language: half general, 20% medical, 30% pairs of the tokens (pretrain.py's train_weights), whatever the sizes
# of the files. Without the pairs here, chat fine-tuning alone did not teach this model to translate within the
# demo's budget: it wrote fluent history unrelated to the sentence (BLEU-4 under 1 against the copy baseline's 21).
import os

out_dir = "out/zh/medical"
init_ckpt = "out/zh/pretrain/ckpt.pt"
train_data = "out/zh/data/train.bin,out/zh/data_medical/train.bin,out/zh/data_pairs/train.bin"
train_weights = "0.5,0.2,0.3"
val_data = "out/zh/data_medical/val.bin"  # held-out medical text; eval.py --mode=ppl measures the general text after
gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))
batch_size = 16 // gradient_accumulation_steps
learning_rate = 1e-3  # a new warm-up and decay from a third of pretraining's peak
min_lr = 1e-4
warmup_iters = 20
max_iters = 900
lr_decay_iters = 900
eval_interval = 300
eval_iters = 20
seed = 1337
compile = False
