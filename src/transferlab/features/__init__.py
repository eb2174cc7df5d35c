"""Features: the frozen backbone's pooled features, computed once. `backbones` resolves a timm name (or embedded
weights) to a model plus its preprocessing; `extract` streams images through it; `cache` keeps the features on
disk keyed by backbone and image content; `distributed` shards extraction across processes.
"""
