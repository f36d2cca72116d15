"""GPD training, one module per responsibility; :mod:`gpd_fx.trainer` re-exports the public names.

See :mod:`gpd_fx.trainer` for the map of the modules and the path of one training step.
"""
