"""predict: batched probabilities equal one pass of the network in eval mode; the domain asked for is used."""
import numpy as np
import pytest
import torch

from vaeuda import predict
from vaeuda.modelfile import load_model


@pytest.fixture()
def net_and_slices(tiny_source_model):
    net, meta = load_model(tiny_source_model)
    size = net.cfg.input_size
    slices = np.random.default_rng(0).normal(size=(7, 3, size, size)).astype(np.float32)
    return net, meta, slices


@pytest.mark.parametrize("batch_size", [1, 3, 7, 16])
def test_batched_probabilities_equal_one_eval_pass(net_and_slices, batch_size):
    """7 slices in batches of 1, 3 (a short last batch), 7 or 16 give the softmax over classes of
    one pass in eval mode (BatchNorm's running statistics), even for a network left in train mode."""
    net, _, slices = net_and_slices
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net.segment_logits(torch.from_numpy(slices), "source"), 1).numpy()
    net.train()
    probs = predict.slice_probabilities(net, slices, "source", torch.device("cpu"), batch_size=batch_size)
    assert probs.shape == expected.shape == (7, net.cfg.n_classes) + slices.shape[2:]
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)     # float16 storage
    np.testing.assert_allclose(probs.astype(np.float32).sum(1), 1.0, atol=5e-3)


def test_segment_image_uses_the_domain_asked_for(net_and_slices, segmented_domains, tmp_volume):
    """segment_image(domain=None) takes the model's own encoder (source here); an explicit domain wins."""
    net, meta, _ = net_and_slices
    image = tmp_volume(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    for domain in (None, "target", "source"):
        predict.segment_image(net, meta, image, torch.device("cpu"), domain=domain)
    assert segmented_domains == ["source", "target", "source"]
