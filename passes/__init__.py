"""FX graph passes (CCA, attention, MoE fusion, TiDAR step packing) and the pass manager."""
