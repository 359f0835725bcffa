"""The answer head (annotator.answer_head): fitted in closed form, written as a LoRA on lm_head, served merged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from annotator.answer_head import choose_head, fit_head, has_head_module, head_logprobs, write_head
from annotator.finetune import FinetuneArgs, load_lora_model
from annotator.tiny import build_tiny_gemma3


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States whose dimensions differ in scale by 100x, and classes from a planted linear rule on them."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 10.0, 16)
    states = rng.normal(size=(n, 16)) * scales
    rule = np.random.default_rng(99).normal(size=(3, 16)) / scales
    return states, rule, (states @ rule.T + 0.1 * rng.gumbel(size=(n, 3))).argmax(1)


def _accuracy(logprobs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(logprobs.argmax(1) == targets))


def test_the_head_learns_a_planted_rule_and_is_kept_only_where_it_beats_no_head() -> None:
    states, _, targets = _planted(800, 0)
    dev_states, rule, dev_targets = _planted(400, 1)
    zeros, dev_zeros = np.zeros((800, 3)), np.zeros((400, 3))
    head = fit_head(states, zeros, targets, np.ones(800), l2=1e-3)
    assert head.shape == (3, 16)
    assert _accuracy(head_logprobs(dev_states, dev_zeros, head), dev_targets) > 0.9  # chance is about 1/3
    score = lambda logprobs, rows: _accuracy(logprobs, dev_targets[rows])  # noqa: E731
    better = lambda value, best: value > best  # noqa: E731
    chosen, report = choose_head((states, zeros, targets, np.ones(800)), (dev_states, dev_zeros), (1e-3, 1.0), score,
                                 better)
    assert chosen is not None and report["used"] and report["dev_without_head"] < 0.5 and report["l2"] == 1e-3
    # labels the model already gets right: no head beats them, so none is kept
    perfect = 100 * np.eye(3)[dev_targets]
    chosen, report = choose_head((states, 100 * np.eye(3)[targets], targets, np.ones(800)), (dev_states, perfect),
                                 (1e-3,), score, better)
    assert chosen is None and not report["used"] and report["dev_without_head"] == 1.0
    # a head whose dev gain is within dev's noise is not kept: four dev pairs, the model already right on three
    # (firmly), the head fixing the fourth; a resample without that pair is a tie, (3/4)^4 of them
    right = np.flatnonzero(head_logprobs(dev_states, dev_zeros, head).argmax(1) == dev_targets)[:4]
    few_targets = dev_targets[right]
    few = 50.0 * np.eye(3)[few_targets]
    few[0] = 0.1 * np.eye(3)[(few_targets[0] + 1) % 3]
    chosen, report = choose_head((states, zeros, targets, np.ones(800)), (dev_states[right], few), (1e-3,),
                                 lambda logprobs, rows: _accuracy(logprobs, few_targets[rows]), better)
    assert report["dev_without_head"] == 0.75 and report["dev_by_l2"]["0.001"] == 1.0
    assert report["best_l2"] == 1e-3 and 0.5 < report["p_better"] < 0.95 and chosen is None and not report["used"]


def test_the_head_adds_exactly_its_logits_to_the_labels_and_survives_a_merge_into_a_tied_model(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from annotator.backends.merged import _write_merged

    base_dir = build_tiny_gemma3(tmp_path / "gemma")  # Gemma ties lm_head to the input embeddings
    model = load_lora_model(base_dir, FinetuneArgs(train_top_k=1)).eval()
    assert model.get_base_model().config.tie_word_embeddings and has_head_module(model)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lm_head" in name), "fitted, not trained"
    assert any(p.requires_grad for name, p in model.named_parameters() if "layers.2." in name)
    ids = torch.tensor([[5, 17, 40, 9, 33, 71]])
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True)
    labels = [11, 12, 13]
    head = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    write_head(model, head, labels)
    with torch.no_grad():
        after = model(input_ids=ids).logits[0]
    states = before.hidden_states[-1][0]  # the final normed states lm_head reads
    expected = before.logits[0].clone()
    expected[:, labels] += states @ torch.as_tensor(head).T
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(after[:, :11], before.logits[0][:, :11]), "no other token moves"

    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(str(adapter), save_embedding_layers=False)
    merged_dir.mkdir()
    _write_merged(base_dir, adapter, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                         str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits[0], reloaded(input_ids=ids).logits[0], atol=1e-4,
                                   rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0], after, atol=1e-5, rtol=1e-5)
    assert not merged.config.tie_word_embeddings
    # the labels' input embeddings stay the base model's: the prompt that spells them reads the same vectors
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_write_head_refuses_more_labels_than_the_lora_rank(tmp_path: Path) -> None:
    model = load_lora_model(build_tiny_gemma3(tmp_path / "gemma"), FinetuneArgs(train_top_k=1, lora_r=2))
    with pytest.raises(ValueError, match="rank >= 3"):
        write_head(model, np.zeros((3, 64), dtype=np.float32), [11, 12, 13])
