"""Generation with the training model: a KV cache over the trunk and every head layer
(cache.py), greedy and self-speculative decoding (decode.py), and loading a checkpoint or an
export for it (load.py)."""
