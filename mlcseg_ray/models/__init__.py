"""The frozen backbones: timm models, checkpoint layouts mapped to timm's, and the feature extractor."""
