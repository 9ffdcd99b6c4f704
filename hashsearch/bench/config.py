"""The options of `hashsearch eval` and `hashsearch bench`: declared in hashsearch.config, with every other option."""
from ..config import BASELINES, EVAL_MODES, EncodeBenchConfig, EvalConfig, ExhaustiveBenchConfig

__all__ = ["BASELINES", "EVAL_MODES", "EncodeBenchConfig", "EvalConfig", "ExhaustiveBenchConfig"]
