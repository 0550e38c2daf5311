"""LoRA and DoRA layers that wrap a model's linears, and putting them on a model, saving, loading and fusing them."""
