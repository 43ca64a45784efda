"""Array algorithms: resampling, the lung mask, the DRR projector and rendering, nodule masks, crops and features."""
