"""Generation with the training model: a KV cache over the trunk and every head layer
(cache.py), greedy and self-speculative decoding (decode.py); models are read by
mtp_dist.sources."""
