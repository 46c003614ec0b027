"""Quality evaluation: perplexity (and, with the `eval` extra, zero-shot tasks)."""

from rsavq.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
