"""Evaluation metrics that are not tied to Lightning (FID, ...)."""

from dbl.evaluation.fid import FeatureExtractor, frechet_distance, reference_statistics

__all__ = ["FeatureExtractor", "frechet_distance", "reference_statistics"]
