"""annotator: labels (query, product) pairs with a policy-prompted LLM, optionally through a LoRA adapter.

Modules: prompts (policies: label definitions and the prompt), labeler (policy + model + adapter ->
label probabilities), backends/ (vLLM in-process, OpenAI-compatible servers, transformers), batch
(the resumable `mnr label` job), models (pullable local models), finetune + calibration (LoRA
training and temperature), stack (the calibrated combiner of the labeler's scores and lexical features), evaluation (agreement with human labels), serve (`mnr serve`).
"""
