"""The size of the natural gradient against the weight, per layer: why EDSG's step is relative.

    python benchmarks/edsg_scale.py --json benchmarks/results/edsg-scale.json

Collects (or reuses from the cache) the default's Fisher statistics of SmolLM2-135M (64 x 512
C4 windows) and prints the quantiles over layers of `||ng|| / ||W||`, `ng` the damped natural
gradient EDSG steps along (docs/method.md section 3). The paper's literal step `lambda * ng`
moves a layer by `lambda` times that ratio of its norm.
"""

from __future__ import annotations

import argparse
import json

import torch

from rsavq.algorithms.natural_gradient import natural_gradient
from rsavq.api import Calibration, fisher_statistics
from rsavq.config import preset
from rsavq.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    config = preset("default", 3)
    calibration = Calibration().resolved(config.bits)
    stats = fisher_statistics(model, tokenizer, calibration, bits=config.bits, model_id=args.model)
    modules = dict(model.named_modules())
    ratios = []
    for name in stats.layer_names:
        ng = natural_gradient(stats.layer(name), config.damping)
        ratios.append(ng.norm().item() / modules[name].weight.detach().float().norm().item())
    q = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor([0, 0.5, 1.0]).double())
    result = {
        "model": args.model,
        "fisher_windows": calibration.fisher_nsamples,
        "layers": len(ratios),
        "ng_over_w": {"min": q[0].item(), "median": q[1].item(), "max": q[2].item()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
