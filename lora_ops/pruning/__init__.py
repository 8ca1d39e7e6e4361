"""LoRA-guided structured pruning (LoRAPrune) and its baselines: structure discovery with the
GQA-aware grid, importance strategies, the in-loop controller, physical pruning and export."""

from lora_ops.pruning.controller import LoRAPruneController, expand_unit_mask, mask_directions
from lora_ops.pruning.export import layer_widths, load_pruned_model, prune_model, save_pruned
from lora_ops.pruning.importance import (
    IMPORTANCES,
    Importance,
    get_importance,
    lora_gradient_estimate,
    reduce_to_units,
    tied_unit_scores,
)
from lora_ops.pruning.masked import MaskedLoRALinear
from lora_ops.pruning.schedule import PruneSchedule
from lora_ops.pruning.structure import PruneStructure, discover_structure, exempt_layers, pruning_grid

__all__ = [
    "IMPORTANCES", "Importance", "LoRAPruneController", "MaskedLoRALinear", "PruneSchedule", "PruneStructure",
    "discover_structure", "exempt_layers", "expand_unit_mask", "get_importance", "layer_widths",
    "load_pruned_model", "lora_gradient_estimate", "mask_directions", "prune_model", "pruning_grid",
    "reduce_to_units", "save_pruned", "tied_unit_scores",
]
