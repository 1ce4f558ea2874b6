"""What quantization did, module by module: metrics, taps, compare, sensitivity, heatmaps, divergence,
provenance, A/B and the three-way check."""
