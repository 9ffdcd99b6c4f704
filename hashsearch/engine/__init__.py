"""Search: coarse binary index, then fine L2 rerank.  Never imports the CLI."""
from .coarse import KINDS as COARSE_KINDS
from .exhaustive import load_flat_l2, scan_knn
from .index import DEFAULT_POOL, MODES, Index, SearchResult

__all__ = ["Index", "SearchResult", "MODES", "COARSE_KINDS", "DEFAULT_POOL", "load_flat_l2", "scan_knn"]
