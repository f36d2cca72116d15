"""Zoo benchmark: does ``gpd_fx.expand`` give an exact teacher on every model of a model zoo?

    python benchmarks/zoo.py                                  # torchvision, ratios 2 and 3
    python benchmarks/zoo.py --source timm --ratio 2          # one model per timm family
    python benchmarks/zoo.py --models resnet18,swin_t --ratio 2 --json /tmp/zoo.json

The sweep (command line, one worker subprocess per model and ratio, table, summary, JSON) is
:mod:`gpd_fx.testing.zoo`, so that ``gpd-fx zoo`` runs the same code from an installed package;
what one row measures is :func:`gpd_fx.testing.measure`, which the test suite uses too.
This script only keeps the command that the benchmark tables in ``benchmarks/README.md`` quote.
"""

import sys

from gpd_fx.testing.zoo import main

if __name__ == "__main__":
    sys.exit(main())
