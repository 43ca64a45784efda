"""Array algorithms: resampling, the lung mask, the DRR projector and rendering, nodule crops and features."""
