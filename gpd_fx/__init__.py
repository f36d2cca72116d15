"""gpd_fx: Gap Preserving Distillation as torch.fx graph passes."""
