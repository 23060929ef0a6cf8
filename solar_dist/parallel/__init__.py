"""Distribution: process groups (dp x sp), TorchRec sharding plans, the DeepSpeed engine for the tower."""
