"""A tiny random Llama with its own tokenizer, for tests: loads in transformers, peft and vLLM.

The tokenizer is a byte-level BPE trained (with the `tokenizers` library) on the policy prompts,
the label names of every scheme and some catalogue words, so prompts encode to a few hundred
tokens and every label name is one token. Weights are random but seeded, with a wide init so the
label probabilities differ clearly from uniform; the output layer is
scaled down so they stay clear of 0 and 1. Head size 32 is the smallest vLLM's CPU
attention backend supports.
"""
from __future__ import annotations

import json
from pathlib import Path

from labelstore.paths import prompts_dir

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# The wide init (0.3) gives label probabilities down to 0.002; halving the output layer keeps them in
# about [0.03, 0.75], so backends compared at 1e-3 differ measurably if they disagree.
LM_HEAD_SCALE = 0.5
CATALOG_WORDS = (
    "drill cordless battery charger bit screwdriver hammer saw blade wrench socket set kit paint brush roller tape "
    "faucet sink kitchen bathroom shower head toilet seat lamp bulb led light switch outlet cable wire extension cord "
    "door knob lock hinge handle cabinet shelf bracket screw nail bolt nut washer anchor glue caulk sealant tile floor "
    "carpet rug mat curtain rod blind window fan heater filter air water hose nozzle garden mower trimmer grill cover "
    "phone case laptop bag shoe sock shirt jacket coat black white red blue green grey silver steel wood plastic metal "
    "small large medium inch ft pack pair volt watt amp gallon oz lb mm cm 1 2 3 4 5 6 7 8 9 10 12 18 20 24 36 48 "
    "brand model replacement compatible pro max mini ultra premium heavy duty outdoor indoor wireless portable"
)


# The policy files the tokenizer learns from. Fixed, so that adding a policy does not change the
# tiny model every test uses; every scheme's label names are still single tokens (see below).
CORPUS_POLICIES = ("_pair", "esci", "home-improvement")


def _training_corpus() -> list[str]:
    texts: list[str] = []
    policies = [p for p in sorted((prompts_dir() / "policies").glob("*")) if p.is_file() and p.stem in CORPUS_POLICIES]
    schemes = [p for p in sorted((prompts_dir() / "schemes").glob("*")) if p.is_file()]
    # a policy's [[flags]] tables are left out, so declaring a flag does not change the tiny model
    texts.extend(p.read_text(encoding="utf-8").split("[[flags]]")[0] for p in policies + schemes)
    label_words = []
    for scheme_file in sorted((prompts_dir() / "schemes").glob("*.toml")):
        import tomllib

        label_words.extend(label["name"] for label in tomllib.loads(scheme_file.read_text())["labels"])
    texts.extend([" ".join(f"Label: {w}" for w in label_words)] * 50)
    texts.extend(["Flag prohibited: yes Flag adult: no"] * 50)  # a flag's answers are single tokens too
    texts.extend([CATALOG_WORDS] * 5)
    texts.append("Query: <query> </query> Product: <product> title: brand: description: </product> Label:")
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """A `PreTrainedTokenizerFast` (byte-level BPE) trained on the project's prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random `LlamaForCausalLM` and its tokenizer to `out_dir`; returns `out_dir`.

    About 0.3 M parameters: hidden 64, 2 layers, 2 heads of size 32, vocabulary ~1k, context
    4096, float32. Same seed, same weights and tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        initializer_range=0.3, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # a softer output layer: label probabilities clear of 0 and 1, argmax (greedy) unchanged
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return _write_tiny(Path(out_dir), model, tokenizer)


def build_tiny_gemma3(out_dir: Path, seed: int = 0, sliding_window: int = 8) -> Path:
    """Write a tiny random `Gemma3ForCausalLM` (3 blocks: two local ones with a ``sliding_window`` of a few
    tokens, then a global one, as Gemma 3 interleaves them) and the tiny tokenizer to `out_dir`; float32."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=4096, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.float32)
    return _write_tiny(Path(out_dir), model, tokenizer)


def _write_tiny(out_dir: Path, model: object, tokenizer: object) -> Path:
    """Save a tiny model and its tokenizer to ``out_dir``, its config saying float32; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    _set_json(out_dir / "config.json", torch_dtype="float32", dtype="float32")
    return out_dir


def _set_json(path: Path, **values: object) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def build_tiny_adapter(base_dir: Path, out_dir: Path, seed: int = 1, rank: int = 8,
                       meta: dict[str, object] | None = None) -> Path:
    """Write a random LoRA adapter (PEFT `save_pretrained`) for the tiny Llama at `base_dir`.

    Both LoRA matrices are random (not the usual zero B), so the adapter changes the scores.
    `meta`, when given, is written as `meta.json` (e.g. {"temperature": 2.0}).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if meta is not None:
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir
