"""fedpeft: federated parameter-efficient fine-tuning on Flower, with LoRA adapters as the only thing that travels."""

__version__ = "0.1.0"
