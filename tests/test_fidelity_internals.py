"""Guard on the torch-fidelity internals var/eval calls (pinned in setup.py to the tested 0.4 series).

Each test names the internal it checks, so an upgrade that changes a signature or a return structure fails here
with that name instead of deep inside an evaluation.  Fast: random features, no weights.
"""

import inspect

import pytest
import torch
import torch_fidelity
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from var.eval.fidelity import INCEPTION, fidelity_kwargs, register_extractor


def changed(internal: str, what: str) -> str:
    return (f"torch-fidelity {torch_fidelity.__version__} changed {internal}: {what}; var/eval relies on it "
            "(tested with 0.4.x, the range pinned in setup.py)")


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_options_we_pass_are_still_options():
    passed = {"cuda", "verbose", "cache", "save_cpu_ram", "datasets_download", "kid_subsets", "kid_subset_size",
              "prc_neighborhood", "feature_extractor_weights_path"}
    assert passed <= set(DEFAULTS), changed("torch_fidelity.defaults.DEFAULTS", f"lost {passed - set(DEFAULTS)}")


def test_registry():
    assert isinstance(FEATURE_EXTRACTORS_REGISTRY, dict) and FEATURE_EXTRACTORS_REGISTRY.get(INCEPTION) is \
        FeatureExtractorInceptionV3, changed("torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY",
                                             f"no longer a dict mapping '{INCEPTION}' to FeatureExtractorInceptionV3")
    assert parameters(register_feature_extractor) == ["name", "cls"], \
        changed("torch_fidelity.registry.register_feature_extractor", "signature is not (name, cls)")


class _Doubler(FeatureExtractorBase):
    """The smallest extractor: the contract our digit-classifier extractor implements."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("double",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "double"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 2, 2, dtype=torch.uint8)

    def forward(self, images):
        return (images.float().flatten(1) * 2,)


def test_feature_extractor_contract():
    assert parameters(FeatureExtractorBase.__init__)[1:] == ["name", "features_list"], \
        changed("FeatureExtractorBase.__init__", "signature is not (name, features_list)")
    assert parameters(create_feature_extractor)[:3] == ["name", "list_features", "cuda"], \
        changed("torch_fidelity.utils.create_feature_extractor", "signature is not (name, list_features, cuda, ...)")
    register_extractor("var-internals-guard", _Doubler)
    network = create_feature_extractor("var-internals-guard", ["double"], **fidelity_kwargs(False))
    images = torch.randint(0, 255, (2, 3, 2, 2), dtype=torch.uint8)
    out = network(images)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], images.float().flatten(1) * 2), \
        changed("torch_fidelity.utils.create_feature_extractor", "the network no longer returns our forward's tuple")
    assert not network.training and not any(p.requires_grad for p in network.parameters()), \
        changed("torch_fidelity.utils.create_feature_extractor", "no longer returns an eval-mode, frozen network")


def test_inception_extractor_layers_and_constructor():
    assert parameters(FeatureExtractorInceptionV3.__init__)[1:4] == ["name", "features_list",
                                                                    "feature_extractor_weights_path"], \
        changed("FeatureExtractorInceptionV3.__init__", "signature is not (name, features_list, weights_path, ...)")
    provided = FeatureExtractorInceptionV3.get_provided_features_list()
    assert {"2048", "logits_unbiased"} <= set(provided), \
        changed("FeatureExtractorInceptionV3.get_provided_features_list", f"now {provided}")
    default_layer = FeatureExtractorInceptionV3.get_default_feature_layer_for_metric
    layers = {metric: default_layer(metric) for metric in ("fid", "kid", "prc", "isc")}
    assert layers == {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"}, \
        changed("FeatureExtractorInceptionV3.get_default_feature_layer_for_metric", f"now {layers}")
    assert "load_state_dict" in inspect.getsource(FeatureExtractorInceptionV3.__init__), \
        changed("FeatureExtractorInceptionV3.__init__", "no longer loads weights through self.load_state_dict, which "
                "var.eval.fidelity.write_random_inception_weights overrides")


@pytest.fixture
def features():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12, 8, generator=generator), torch.randn(10, 8, generator=generator) + 0.5


def test_kid_features_to_metric(features):
    out = kid_features_to_metric(*features, **fidelity_kwargs(False, kid_subsets=4, kid_subset_size=6))
    assert isinstance(out, dict) and {KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD} <= set(out), \
        changed("torch_fidelity.metric_kid.kid_features_to_metric", f"returns {out!r}")
    assert all(isinstance(out[k], float) for k in (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD)), \
        changed("torch_fidelity.metric_kid.kid_features_to_metric", "values are no longer floats")


@pytest.mark.parametrize("save_cpu_ram", [True, False])
def test_prc_features_to_metric(features, save_cpu_ram):
    out = prc_features_to_metric(*features, **fidelity_kwargs(False, prc_neighborhood=3, save_cpu_ram=save_cpu_ram))
    assert isinstance(out, dict) and {KEY_METRIC_PRECISION, KEY_METRIC_RECALL} <= set(out), \
        changed("torch_fidelity.metric_prc.prc_features_to_metric", f"returns {out!r}")
    assert all(0 <= float(out[k]) <= 1 for k in (KEY_METRIC_PRECISION, KEY_METRIC_RECALL)), \
        changed("torch_fidelity.metric_prc.prc_features_to_metric", "precision/recall are no longer fractions")
