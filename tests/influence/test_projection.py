"""Projections: deterministic from (seed, layer), unbiased, and how close projected grad-dot is to exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from influence.data import collate, encode_examples, read_labelled_tsv
from influence.errors import InvalidInputError
from influence.gradients import Featurizer, per_sample_gradients
from influence.layers import Layer, discover_layers, select_layers
from influence.loading import load_model, packaged_minilm_path
from influence.projection import (
    ProjectionSpec,
    factor_dims,
    hashed_normal,
    hashed_signs,
    make_projector,
    random_matrix,
    stream_key,
)
from tests.conftest import SST2


def _layer(name="block.0.attn.q", rows=8, cols=6, kind="linear", bias=True):
    return Layer(name, "x", kind, "attention", 0, rows, cols, bias, False)


def test_hashed_randoms_are_deterministic_sliceable_and_standard():
    key = stream_key(0, "block.0.attn.q", "in")
    rows, cols = torch.arange(64), torch.arange(20000)
    full = hashed_normal(key, rows, cols, torch.float64)
    assert torch.equal(full, hashed_normal(key, rows, cols, torch.float64))
    # any slice is generated on its own: the dense row-sparse embedding path relies on it
    assert torch.equal(full[5:9, 1000:1010], hashed_normal(key, rows[5:9], cols[1000:1010], torch.float64))
    other_layer = hashed_normal(stream_key(0, "block.0.attn.k", "in"), rows, cols, torch.float64)
    other_seed = hashed_normal(stream_key(1, "block.0.attn.q", "in"), rows, cols, torch.float64)
    assert not torch.equal(full, other_layer) and not torch.equal(full, other_seed)
    # 1.28M draws: the standard error of the mean is 0.0009 and of the variance 0.0013
    assert abs(float(full.mean())) < 0.005 and abs(float(full.var()) - 1) < 0.01
    assert abs(float((full**3).mean())) < 0.02 and abs(float((full**4).mean()) - 3) < 0.05  # Gaussian shape
    assert abs(float(np.corrcoef(full[0].numpy(), full[1].numpy())[0, 1])) < 0.05
    signs = hashed_signs(key, rows, cols)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(float(signs.mean())) < 0.005


def test_projection_is_unbiased_for_inner_products():
    """E[P^T P] = I: averaged over many seeds, projected inner products approach the exact ones."""
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(300, generator=gen, dtype=torch.float64),
        torch.randn(300, generator=gen, dtype=torch.float64),
    )
    y = y + 0.5 * x  # a positive inner product, as for related samples
    for kind in ("gaussian", "rademacher"):
        estimates = []
        for seed in range(400):
            p = random_matrix(stream_key(seed, "u", kind), 32, 300, kind, torch.float64, "cpu")
            estimates.append(float((p @ x) @ (p @ y)))
        mean, sem = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
        assert abs(mean - float(x @ y)) < 4 * sem, kind


def test_factor_dims_split_the_budget():
    assert factor_dims(8, 8, 256) == (None, None)  # small: exact
    assert factor_dims(384, 385, 256) == (16, 16)
    assert factor_dims(4, 384, 256) == (None, 64)  # LoRA A: rank side exact, the rest to the input side
    assert factor_dims(384, 4, 256) == (64, None)  # LoRA B
    assert factor_dims(2, 385, 256) == (None, 128)  # a 2-class head


def test_projector_dims_and_identity_limit():
    assert make_projector(ProjectionSpec("factorized", 256), _layer(rows=384, cols=384)).dim == 256
    assert make_projector(ProjectionSpec("identity"), _layer(rows=8, cols=6)).dim == 8 * 6 + 8
    assert make_projector(ProjectionSpec("gaussian", 100), _layer(rows=384, cols=384)).dim == 100
    with pytest.raises(InvalidInputError, match="identity"):
        make_projector(ProjectionSpec("identity"), _layer("embed", 30522, 384, "embedding", False))
    with pytest.raises(InvalidInputError):
        make_projector(ProjectionSpec("sparse-magic"), _layer())


@pytest.fixture(scope="module")
def minilm_gradients():
    """Exact per-sample gradients of real MiniLM units on 112 SST-2 rows (96 train, 16 test), LoRA on q/v."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(packaged_minilm_path())
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    model = get_peft_model(loaded.model, config)
    layers = select_layers(
        discover_layers(model),
        [
            "block.2.attn.v",
            "block.3.mlp.down",
            "pooler",
            "head",
            "block.2.attn.v.lora_A",
            "block.2.attn.v.lora_B",
        ],
    )
    rows = read_labelled_tsv(SST2 / "train.tsv", limit=112)
    batch = collate(
        encode_examples(loaded.tokenizer, rows, "classification", 64), 0, "classification", range(len(rows))
    )
    return model, layers, batch, per_sample_gradients(model, batch, layers)


def _fidelity(exact, projected, n_train=96):
    """(relative error of the score matrix, mean over test columns of the Spearman of train rankings)."""
    s_exact = exact[:n_train].double() @ exact[n_train:].double().T
    s_proj = projected[:n_train].double() @ projected[n_train:].double().T
    rel = float((s_proj - s_exact).norm() / s_exact.norm())
    rho = float(np.mean([spearmanr(s_exact[:, j], s_proj[:, j]).statistic for j in range(s_exact.shape[1])]))
    return rel, rho


def test_projected_grad_dot_fidelity_by_dimension(minilm_gradients, record_property):
    """Mean relative error and Spearman of projected vs exact grad-dot scores at several dimensions.

    Johnson-Lindenstrauss: the error of a k-dimensional projection shrinks like 1/sqrt(k), so going from 64 to
    1024 dimensions should cut it by about 4x on average; the bounds below are set from that scaling with
    margin for the randomness of three seeds. The figures are printed (pytest -s) and recorded.
    """
    model, layers, batch, exact = minilm_gradients
    report = {}
    for kind, dims, names in [
        ("factorized", (64, 256, 1024), [layer.name for layer in layers]),
        ("gaussian", (64, 256), ["head", "block.2.attn.v.lora_A", "block.2.attn.v.lora_B"]),
    ]:
        chosen = [layer for layer in layers if layer.name in names]
        for dim in dims:
            rels, rhos = [], []
            for seed in range(3):
                features = (
                    Featurizer(model, chosen, ProjectionSpec(kind, dim, seed)).featurize(batch).features
                )
                for layer in chosen:
                    rel, rho = _fidelity(exact[layer.name], features[layer.name])
                    rels.append(rel)
                    rhos.append(rho)
            report[(kind, dim)] = (float(np.mean(rels)), float(np.mean(rhos)))
    for (kind, dim), (rel, rho) in report.items():
        print(f"{kind:>10} dim {dim:5d}: mean relative error {rel:.3f}, mean Spearman {rho:.3f}")
        record_property(f"{kind}-{dim}", f"rel={rel:.3f} spearman={rho:.3f}")
    assert report[("factorized", 1024)][0] < 0.5 * report[("factorized", 64)][0]
    assert report[("factorized", 1024)][1] > report[("factorized", 256)][1] > report[("factorized", 64)][1]
    assert report[("factorized", 1024)][1] > 0.85
    assert report[("gaussian", 256)][0] < 0.6 * report[("gaussian", 64)][0]
    assert report[("gaussian", 256)][1] > 0.85
