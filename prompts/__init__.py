"""Label schemes (`schemes/*.toml`) and policy prompts (`policies/*.toml`, `*.j2`), shipped as package data.

Data only: `labelstore.paths.prompts_dir()` finds this folder. Prompts are versioned by content hash,
so edit a file's bytes only to change the prompt.
"""
