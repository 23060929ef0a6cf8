"""solar-dist: SOLAR (SVD-Optimized Lifelong Attention for Recommendation) on TorchRec, DeepSpeed and Ray."""
__version__ = "0.1.0"
