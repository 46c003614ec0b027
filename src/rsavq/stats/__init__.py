"""Fisher statistics: Kronecker-factored empirical Fisher and mean gradient per linear layer.

Glossary (docs/method.md section 1), for a layer `y = x W^T`, `W` `[m, n]`:
- `G_s` `[m, n]`: gradient of sequence s's mean next-token loss w.r.t. `W`.
- `F_O` `[m, m]` = mean_s G_s G_s^T (or only its diagonal `[m]` in the diagonal-output mode).
- `F_I` `[n, n]` = mean_s G_s^T G_s.
- `g` `[m, n]` = mean_s G_s; `sq_norm` = mean_s ||G_s||_F^2; `count` = number of sequences.
"""

from rsavq.stats.accumulator import FisherAccumulator, LayerFisher
from rsavq.stats.artifact import FisherStats, load_stats, save_stats
from rsavq.stats.collect import collect_fisher

__all__ = [
    "FisherAccumulator",
    "FisherStats",
    "LayerFisher",
    "collect_fisher",
    "load_stats",
    "save_stats",
]
