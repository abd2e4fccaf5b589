"""Models: loading, the architecture table, hooks."""

from lmedit.models.arch import ARCHITECTURES, Arch, arch_for, mlp_out_module, mlp_out_name, num_layers
from lmedit.models.loading import DEFAULT_MODEL, LoadedModel, Placement, load_model

__all__ = ["ARCHITECTURES", "Arch", "arch_for", "mlp_out_module", "mlp_out_name", "num_layers",
           "DEFAULT_MODEL", "LoadedModel", "Placement", "load_model"]
