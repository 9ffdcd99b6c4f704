"""hashsearch: image retrieval with deep binary hash codes (Lin et al., CVPRW 2015).

    from hashsearch import Encoder, Collection, Index
"""
from .errors import HashsearchError

__version__ = "0.1.0"

# Imported on first use: DataLoader workers import hashsearch.encoders.images and
# must not pay for h5py, faiss or torch, and search-only users never load torch.
_LAZY = {
    "Encoder": ("hashsearch.encoders.encoder", "Encoder"),
    "Collection": ("hashsearch.shards", "Collection"),
    "CollectionWriter": ("hashsearch.shards", "CollectionWriter"),
    "Index": ("hashsearch.engine", "Index"),
    "SearchResult": ("hashsearch.engine", "SearchResult"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hashsearch' has no attribute {name!r}")


__all__ = ["Encoder", "Collection", "CollectionWriter", "Index", "SearchResult", "HashsearchError"]
