"""Patch encoders: labelled tiles, multitask training, linear probes.

Modules: ``tiles`` (reading, resampling, augmenting and embedding labelled tiles), ``config``
(training configs), ``taskdata`` (one task's tiles, split and batches), ``metrics`` (validation
metrics and the early-stopping score), ``train`` (``nic train-encoder``: the loop and the model
card), ``probe`` (``nic probe``: linear probes with group-aware cross-validation).
"""
