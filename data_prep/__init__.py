"""Data preparation: tokenizers, and corpora -> megatron-core .bin/.idx token shards.

Command line: `python -m data_prep --help`.
"""
