"""Training-only code: the train config, the TI loss, the optimizer and the figures a run writes.

The rest of `ldm/` (models, weights I/O, tokenizer, sampling) never imports from here.
"""
