"""The FX passes behind gpd_fx (installed as ``gpd_fx.passes``)."""
