"""Patch encoders: labelled tiles, multitask training, linear probes."""
