"""The reward model (InstructGPT's RM, Ouyang et al. 2022): a Transformer whose last real token's final hidden state
goes through one linear layer to a scalar; its pairwise Bradley-Terry loss; loading one; batched scoring of
conversations. PPO's value model is one too (RewardModel.values)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.checkpoint_io import load
from babyllama.generate import right_pad
from babyllama.lora import apply_lora, merge_lora
from model import ModelArgs, Transformer
from tokenizer.chat_template import encode_conversation


class RewardModel(nn.Module):
    """A scalar reward for a whole sequence: body (a Transformer, usually the SFT model) reads prompt + reply; its final
    normalised hidden state at the last real token goes through head (dim -> 1). Right padding is never read."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.args.dim, 1)
        nn.init.normal_(self.head.weight, std=1 / (body.args.dim + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def args(self):
        return self.body.args

    def optimizer_groups(self, weight_decay, muon=False):
        """The body's AdamW grouping (Transformer.optimizer_groups), head included. ValueError for muon (it would find
        no block matrix under the body's names)."""
        if muon:
            raise ValueError("the reward model trains with AdamW, not 'muon'")
        return Transformer.optimizer_groups(self, weight_decay)

    def hidden(self, seqs, device):
        """The body's final normalised hidden states (B, L, D) of right-padded seqs (B lists of ids)."""
        x, _ = right_pad(seqs, device)
        B, L = x.shape
        return self.body._forward_positions(x, torch.arange(L, device=device).expand(B, L), None, head=False)

    def forward(self, seqs, device):
        """seqs: B lists of token ids -> rewards (B,) float32."""
        h = self.hidden(seqs, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        return self.head(h[torch.arange(len(seqs), device=device), last]).squeeze(-1).float()

    def values(self, prompts, replies, device):
        """PPO's value of every reply token's state: (B, T) float32, column t = the head at the position just before
        reply token t, T = the longest reply."""
        v = self.head(self.hidden([p + r[:-1] for p, r in zip(prompts, replies)], device)).squeeze(-1).float()
        out = torch.zeros((len(replies), max(len(r) for r in replies)), device=v.device)
        for b, (p, r) in enumerate(zip(prompts, replies)):
            out[b, :len(r)] = v[b, len(p) - 1:len(p) - 1 + len(r)]
        return out


def bt_loss(r_chosen, r_rejected, margin=0.0):
    """Bradley-Terry pairwise loss per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def load_reward_model(path, device="cpu"):
    """A RewardModel saved by reward_model.py (its "model": body.* and head.* weights; "model_args": the body's)."""
    ckpt = load(path, "cpu")
    if not any(k.startswith("head.") for k in ckpt.get("model", {})):
        raise ValueError(f"{path} is not a reward model checkpoint (no head.* weights): train one with reward_model.py")
    rm = RewardModel(Transformer(ModelArgs(**ckpt["model_args"])))
    lora = any("lora_" in k for k in ckpt["model"])
    if lora:  # a LoRA reward model: the adapters as trained, then folded into the weights
        cfg = ckpt["config"]
        apply_lora(rm.body, cfg["lora_rank"], cfg["lora_alpha"], 0.0, cfg["lora_targets"])
    rm.load_state_dict(ckpt["model"])
    if lora:
        merge_lora(rm.body)
    return rm.to(device).eval(), ckpt


@torch.no_grad()
def score_conversations(rm, tok, conversations, device, batch_size=16):
    """Rewards (floats) of conversations {"messages": [... ending with an assistant turn], "system"}, batched; the chat
    template's ids, cut to the model's context from the left."""
    seqs = [encode_conversation(tok, c["messages"], c.get("system"))[0][-rm.args.max_seq_len:] for c in conversations]
    out = []
    for i in range(0, len(seqs), batch_size):
        out += rm(seqs[i:i + batch_size], device).tolist()
    return out
