"""hashsearch: image retrieval with deep binary hash codes (Lin et al., CVPRW 2015).

    from hashsearch import Encoder, Collection, Index
"""
from .errors import HashsearchError
from .shards import Collection, CollectionWriter
from .engine import Index, SearchResult

__version__ = "0.1.0"


def __getattr__(name):
    # Encoder pulls in torch (seconds to import); only search-side users skip it.
    if name == "Encoder":
        from .encoders.encoder import Encoder
        return Encoder
    raise AttributeError(name)


__all__ = ["Encoder", "Collection", "CollectionWriter", "Index", "SearchResult", "HashsearchError"]
