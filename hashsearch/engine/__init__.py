"""Search: coarse binary index, then fine L2 rerank.  Never imports the CLI."""
from .coarse import KINDS as COARSE_KINDS
from .exhaustive import load_flat_l2, scan_knn
from .index import MODES, Index, IndexConfig, SearchConfig, SearchResult

__all__ = ["Index", "IndexConfig", "SearchConfig", "SearchResult", "MODES", "COARSE_KINDS", "load_flat_l2", "scan_knn"]
