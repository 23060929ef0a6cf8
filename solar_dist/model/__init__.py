"""Model: TorchRec sparse arch, the SOLAR tower (dense), losses."""
