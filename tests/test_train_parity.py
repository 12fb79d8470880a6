"""Parity: ``vrpo train --method dpo`` computes the same loss and gradients as TRL's
``DPOTrainer`` (loss_type sigmoid) on the same tiny model and batch, to 1e-5.

TRL is an independent implementation (its own tokenisation, collator, log-prob code and
reference forward pass); it is a test-only dependency here.
"""
import copy

import pytest
import torch

from tests.pipeline_helpers import PAIRS, tiny_model_dir


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_dpo_loss_and_gradients_equal_trl(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from vrpo.train.collator import PreferenceCollator, build_features
    from vrpo.train.config import VRPOConfig
    from vrpo.train.methods import METHODS
    from vrpo.train.reference import compute_reference_logps
    from vrpo.train.trainer import VRPOTrainer

    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # move the policy away from the reference so rewards are not all zero
        for p in base.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ref = AutoModelForCausalLM.from_pretrained(path)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    n = len(rows)

    # TRL 1.16
    trl_model = copy.deepcopy(base)
    trl_args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], max_length=None,
                             per_device_train_batch_size=n, report_to="none", use_cpu=True, disable_dropout=True,
                             bf16=False)  # TRL defaults to bf16 autocast of the reference model
    trl_trainer = trl.DPOTrainer(model=trl_model, ref_model=copy.deepcopy(ref), args=trl_args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trl_trainer.get_train_dataloader()))
    trl_trainer.model.train()
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, batch)
    trl_loss.backward()

    # ours
    cfg = VRPOConfig(method="dpo", beta=0.1, max_length=128, max_prompt_length=64)
    features = build_features(rows, tok, cfg, with_reference=False)
    ref_lp = compute_reference_logps(ref, features, tok.pad_token_id, batch_size=n)
    for f, c, r in zip(features, ref_lp["chosen"], ref_lp["rejected"]):
        f.update(ref_chosen_logps=c, ref_rejected_logps=r)
    ours_model = copy.deepcopy(base)
    trainer = VRPOTrainer(model=ours_model, args=TrainingArguments(output_dir=str(tmp_path / "ours"), report_to="none",
                                                                    use_cpu=True),
                          method=METHODS["dpo"], vrpo_config=cfg)
    for m in ours_model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ours_model.train()
    loss = trainer.compute_loss(ours_model, PreferenceCollator(tok.pad_token_id, False)(features))
    loss.backward()

    assert abs(loss.item() - 0.6931) > 1e-3  # not the trivial log 2 of an untouched policy
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    g_ours, g_trl = _grads(ours_model), _grads(trl_trainer.model)
    assert g_ours.keys() == g_trl.keys()
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_trl[name], atol=1e-5, rtol=1e-4, msg=name)
