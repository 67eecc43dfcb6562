"""Plain-Python helpers of the VAEUDASegmentation Slicer module (no Slicer imports)."""
