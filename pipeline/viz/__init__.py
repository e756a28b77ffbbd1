"""Pictures: PCA-RGB views of compressed slides, heatmaps."""
