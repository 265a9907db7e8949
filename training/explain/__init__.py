"""Training-side explanations: the export split (heads), torch Grad-CAM (the reference), feature maps, summary.

The serving side computes the same maps without torch in :mod:`service.cam`.
"""

from training.explain.gradcam import ImageExplanation, explain_image, pearson, torch_gradcam
from training.explain.heads import (
    FEATURE_OUTPUT,
    HEAD_FILE,
    ExplainHead,
    FeaturesAndLogits,
    explain_head,
    feature_layer,
)

__all__ = [
    "FEATURE_OUTPUT", "HEAD_FILE", "ExplainHead", "FeaturesAndLogits", "ImageExplanation", "explain_head",
    "explain_image", "feature_layer", "pearson", "torch_gradcam",
]
