import json

import pytest

from rsavq.config import (
    LayerSpec,
    Metric,
    RSAVQConfig,
    ScalarConfig,
    preset,
)
from rsavq.errors import UsageError


def test_roundtrip_through_dict():
    config = RSAVQConfig(bits=3, metric=Metric.FISHER_DIAG)
    assert RSAVQConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["metric"] == "fisher_diag"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "unsupported bits 9"),
        ({"bits": 0.5}, "unsupported bits"),
        ({"vector_length": 5, "sub_vectors": 2}, "vector length 5 must be a positive multiple of"),
        ({"block_size": 6}, "block size 6 must be a multiple of the vector length 4"),
        ({"vector_length": 12, "sub_vectors": 2, "bits": 3}, "exceed 16 bits"),
        ({"uniform_bits": True, "bits": 2.5}, "uniform bits need a whole number"),
        ({"groups": 0}, "groups and k-means iterations must be >= 1"),
        ({"true_sequential": True, "sequential": False}, "drop --one-pass"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RSAVQConfig(**kwargs)


def test_new_options_keep_the_identity_of_older_configurations():
    assert "true_sequential" not in RSAVQConfig().to_dict()
    staged = RSAVQConfig(true_sequential=True)
    assert RSAVQConfig.from_dict(staged.to_dict()) == staged
    assert ScalarConfig("gptq", true_sequential=True).to_dict()["true_sequential"]
    assert "true_sequential" not in ScalarConfig().to_dict()
    with pytest.raises(UsageError, match="drop --one-pass"):
        ScalarConfig("gptq", sequential=False, true_sequential=True)


def test_codebook_options_round_trip_and_keep_older_identities():
    assert "codebook_dtype" not in RSAVQConfig().to_dict()
    int8 = RSAVQConfig.from_dict({"codebook_dtype": "int8"})
    assert RSAVQConfig.from_dict(int8.to_dict()) == int8
    spec = LayerSpec(8, 4, (8,), (2,), 2, 1, codebook_dtype="int8")
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert "codebook_dtype" not in LayerSpec(8, 4, (8,), (2,), 2, 1).to_dict()


def test_removed_options_read_when_off_and_refused_when_used():
    """Block-shared codebooks, the raw EDSG step and output-channel groups were removed: a
    configuration or spec that has their keys at the off value reads as before; one that used
    them is refused with one line naming the fix."""
    off = {"codebook_scope": "layer", "codebook_fallback": 0.0, "lambda_mode": "relative"}
    assert RSAVQConfig.from_dict(off) == RSAVQConfig()
    with pytest.raises(UsageError, match="codebook_scope .* quantize the model again"):
        RSAVQConfig.from_dict({"codebook_scope": "block"})
    with pytest.raises(UsageError, match="lambda_mode .the raw EDSG step"):
        RSAVQConfig.from_dict({"lambda_mode": "raw"})
    assert RSAVQConfig.from_dict({"channel_axis": "input"}) == RSAVQConfig()
    with pytest.raises(UsageError, match="channel_axis .output-channel groups"):
        RSAVQConfig.from_dict({"channel_axis": "output"})
    spec = LayerSpec(8, 4, (8,), (2,), 2, 1)
    assert LayerSpec.from_dict({**spec.to_dict(), "axis": "input"}) == spec
    with pytest.raises(UsageError, match="output channels .* quantize the model again"):
        LayerSpec.from_dict({**spec.to_dict(), "axis": "output"})
    data = {**LayerSpec(8, 4, (8,), (2,), 2, 1).to_dict(), "codebook_source": ""}
    assert LayerSpec.from_dict(data) == LayerSpec(8, 4, (8,), (2,), 2, 1)
    with pytest.raises(UsageError, match="block-shared codebooks .* quantize the model again"):
        LayerSpec.from_dict({**data, "codebook_source": "model.layers.0.rsavq_codebooks"})


def test_unknown_keys_and_enum_values():
    with pytest.raises(UsageError, match="unknown RSAVQ config keys"):
        RSAVQConfig.from_dict({"bitz": 2})
    with pytest.raises(UsageError, match="metric 'cosine' unknown"):
        RSAVQConfig.from_dict({"metric": "cosine"})


def test_needs_stats_only_for_fisher_features():
    assert RSAVQConfig().needs_stats
    assert not RSAVQConfig(lam=0, groups=1, uniform_bits=True).needs_stats


def test_layer_spec_geometry():
    spec = LayerSpec(
        in_features=100,
        out_features=8,
        group_sizes=(50, 50),
        group_bits=(3, 2),
        vector_length=6,
        sub_vectors=2,
    )
    assert spec.sub_dim == 3 and spec.code_bits(0) == 9 and spec.n_vectors(1) == 9
    assert spec.codes_per_row(1) == 18 and spec.block_shape(0) == (8, 50)
    assert LayerSpec.from_dict(spec.to_dict()) == spec


def test_layer_bits_apply_by_pattern_round_trip_and_are_checked():
    config = preset("default", 3, layer_bits=(("k_proj", 4), ("*.layers.0.*", 2)))
    assert config.for_layer("model.layers.1.self_attn.k_proj").bits == 4
    assert config.for_layer("model.layers.0.mlp.up_proj").bits == 2
    assert config.for_layer("model.layers.1.mlp.up_proj") is config
    assert RSAVQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "layer_bits" not in preset("default", 2).to_dict()  # older identities unchanged
    assert preset("default", 3).layer_bits == (("k_proj", 4), ("v_proj", 4))  # the default's
    assert preset("default", 3, layer_bits=()).for_layer("k_proj").bits == 3
    assert preset("kmeans", 3).layer_bits == preset("default", 2).layer_bits == ()
    four = preset("default", 4)  # k/v at 5 bits, the others' codebooks halved to pay for them
    assert four.layer_bits == (("k_proj", 5), ("v_proj", 5)) and four.codebook_overhead == 0.02
    assert preset("default", 4, codebook_overhead=0.04).codebook_overhead == 0.04
    with pytest.raises(UsageError, match="layer bits k_proj=9"):
        preset("default", 3, layer_bits=(("k_proj", 9),))
