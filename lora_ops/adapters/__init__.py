from lora_ops.adapters.base import AdapterLayer, adapter_layers, unique_adapter_parameters
from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_linear, lora_scale

__all__ = ["AdapterLayer", "LoRALinear", "LoRAPair", "adapter_layers", "lora_linear", "lora_scale",
           "unique_adapter_parameters"]
