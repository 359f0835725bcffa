"""The transformers (+ peft) backend: one forward pass per batch, left padding, last position.

Prompts are tokenized with the tokenizer's defaults (special tokens included), as vLLM does.

For machines without vLLM. Computes the same quantity as the vLLM backend: the log-softmax of
the last-position logits restricted to the label first tokens.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from annotator.backends.base import first_line


class TransformersBackend:
    """Parameters: `model` a local HF folder; `adapter` a PEFT LoRA folder; `dtype` torch dtype
    name ("auto" keeps the checkpoint's); `batch_size` prompts per forward pass."""

    def __init__(self, model: str, adapter: str | None = None, *, dtype: str = "float32", batch_size: int = 8,
                 threads: int | None = None, **_ignored: Any):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        network = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        if adapter is not None:
            from peft import PeftModel

            network = PeftModel.from_pretrained(network, adapter)
        self.model = network.eval()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def label_logprobs(self, prompts: list[str], token_ids: list[int], options: list[str]) -> np.ndarray:
        torch = self.torch
        rows: list[np.ndarray] = []
        index = torch.tensor(token_ids)
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(prompts[start:start + self.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                logits = self.model(**batch).logits[:, -1, :].float()
            rows.append(torch.log_softmax(logits[:, index], dim=-1).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(token_ids)))

    def generate(self, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        torch = self.torch
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        texts: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(prompts[start:start + self.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                tokens = self.model.generate(**batch, max_new_tokens=max_tokens,
                                             pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new_tokens = tokens[:, batch["input_ids"].shape[1]:]
            texts.extend(first_line(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return texts

    def close(self) -> None:
        del self.model
