"""A tiny, fixed-weight torch-fidelity feature extractor: FID tests without Inception weights."""

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

TINY = "dbl-tiny-features"


class TinyFeatures(FeatureExtractorBase):
    """uint8 [N, 3, H, W] -> 8 features: a seeded random conv, global average pool."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.zero_()

    @staticmethod
    def get_provided_features_list():
        return ("8",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "8"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        h = torch.tanh(self.conv(x.float() / 255.0))
        return (torch.cat([h.mean((2, 3))[:, :4], h.std((2, 3))[:, 4:]], dim=1),)


if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TINY, TinyFeatures)
