"""babyllama/models.py: a model back from a LoRA checkpoint whose folder moved (base and adapters merged), and the
fine-tuning start that resumes the adapters on the starting weights."""
import shutil

from conftest import SMALL_ARGS, tiny_model
import torch

from babyllama import checkpoint as ck, models
from babyllama.lora import apply_lora, lora_state_dict


def test_load_model_merges_a_lora_checkpoint_whose_folder_moved(tmp_path):
    base = tiny_model(**SMALL_ARGS)
    ck.save(str(tmp_path / "run" / "base.pt"), {"model": base.state_dict(), "model_args": SMALL_ARGS})
    adapted = apply_lora(tiny_model(**SMALL_ARGS), rank=2, alpha=4.0, targets="wq,w2")
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter changes the outputs
    ck.save(str(tmp_path / "run" / "ckpt.pt"), {"lora": lora_state_dict(adapted), "model_args": SMALL_ARGS,
                                                "lora_config": adapted.lora_config,
                                                "base_ckpt": str(tmp_path / "run" / "base.pt")})
    shutil.move(tmp_path / "run", tmp_path / "moved")  # base_ckpt now names a path that is gone
    model, ckpt = models.load_model(str(tmp_path / "moved" / "ckpt.pt"))
    assert not any("lora_" in k for k in model.state_dict())  # merged: a plain Transformer
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], adapted(x)[0], atol=1e-5)
        assert not torch.allclose(model(x)[0], base(x)[0], atol=1e-3)


def test_finetune_model_resumes_the_adapters_on_the_starting_weights(tmp_path):
    ck.save(str(tmp_path / "base.pt"), {"model": tiny_model(**SMALL_ARGS).state_dict(), "model_args": SMALL_ARGS})
    model, args, start, _ = models.finetune_model(str(tmp_path / "base.pt"), None, "cpu", seed=1, max_seq_len=12,
                                                  lora_rank=2, lora_alpha=4.0, lora_targets="wq")
    assert args["max_seq_len"] == 12 and model.lora_config["alpha"] == 4.0
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)
    saved = {"lora": lora_state_dict(model)}
    again, _, _, _ = models.finetune_model(str(tmp_path / "base.pt"), saved, "cpu", seed=2, max_seq_len=12,
                                           lora_rank=2, lora_alpha=4.0, lora_targets="wq")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    # the starting weights, under their plain names (the DPO reference)
    assert set(start) == set(tiny_model(**SMALL_ARGS).state_dict())
