"""The MiniLM backbones on a handful of texts (the encoder loads in seconds and embeds ~80
snippets/s on a CPU): frozen MiniLM + GPM head fits a cycle BT cannot; the embedding cache
embeds each distinct text once; the end-to-end fine-tuned transformer trains, saves, loads."""
import numpy as np
import pytest

from vrpo.aux import GPM, BradleyTerryAux, load_aux, save_aux
from vrpo.aux.embeddings import load_encoder, minilm_path, shared_cache
from vrpo.aux.synthetic import RPS, rock_paper_scissors_pairs

pytestmark = pytest.mark.slow


def test_minilm_ships_offline_and_embeds_unit_vectors():
    assert (minilm_path() / "model.safetensors").is_file()
    enc = load_encoder()
    v = enc.encode(["a good film", "a bad film"])
    assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert len(enc.fingerprint) == 16


def test_an_empty_response_is_embedded_and_scored_like_any_text():
    """An empty reference sample (pi_ref drew EOS first): "" gets one vector, the same alone or
    batched beside long texts (padding is masked out of the mean), and g scores it."""
    enc = load_encoder()
    alone = enc.encode([""])
    batched = enc.encode(["a long review that says the film was good and the music was better", ""])
    assert np.allclose(alone[0], batched[1], atol=1e-5) and np.isclose(np.linalg.norm(alone[0]), 1, atol=1e-5)
    x, a, b, y = rock_paper_scissors_pairs(30, prompt="Choose a move.", random_state=3)
    g = GPM(backbone="minilm", epochs=2).fit(x, a, b, y)
    G = g.predict_pairwise("Choose a move.", ["rock", "", "paper"])
    assert np.allclose(G + G.T, 1) and G[0, 1] == pytest.approx(g.predict_proba(["Choose a move."], ["rock"], [""])[0])


def test_frozen_minilm_gpm_fits_the_cycle_and_bt_does_not():
    x, a, b, y = rock_paper_scissors_pairs(240, random_state=0)
    xt, at, bt_, yt = rock_paper_scissors_pairs(240, random_state=1)
    acc = {}
    for name, cls in (("gpm", GPM), ("bt", BradleyTerryAux)):
        m = cls(backbone="minilm", epochs=40, lr=3e-3).fit(x, a, b, y)
        acc[name] = np.mean((m.predict_proba(xt, at, bt_) > 0.5) == (yt > 0.5))
    assert acc["gpm"] > 0.85 and acc["bt"] < 0.70, acc


def test_cache_embeds_each_distinct_text_once_and_pairwise_costs_k_embeddings():
    x, a, b, y = rock_paper_scissors_pairs(30, prompt="Choose a move.", random_state=3)
    g = GPM(backbone="minilm", epochs=5).fit(x, a, b, y)
    cache = shared_cache(load_encoder())
    before = cache.num_encoded
    K = ["stone", "sheet of paper", "shears", "lizard", "spock", "a rock", "paper plane", "scissor"]
    G = g.predict_pairwise("Choose a move.", K)  # prompt already cached: K new texts
    assert cache.num_encoded - before == len(K)
    G2 = g.predict_pairwise("Choose a move.", K)
    assert cache.num_encoded - before == len(K) and np.array_equal(G, G2)
    assert np.abs(G + G.T - 1).max() < 1e-6


def test_finetuned_transformer_backbone_trains_saves_and_loads(tmp_path):
    x, a, b, y = rock_paper_scissors_pairs(12, random_state=5)
    g = GPM(backbone="transformer", epochs=1, batch_size=6, random_state=0)
    g.fit(x, a, b, y)
    start = load_encoder().model.state_dict()["encoder.layer.0.attention.self.query.weight"]
    tuned = g.backbone_.model.state_dict()["encoder.layer.0.attention.self.query.weight"]
    assert not np.allclose(start.numpy(), tuned.numpy())  # end to end: the encoder moved
    save_aux(g, tmp_path / "t")
    loaded = load_aux(tmp_path / "t", kind="gpm")
    P, Q = g.predict_pairwise("Pick one.", list(RPS)), loaded.predict_pairwise("Pick one.", list(RPS))
    assert np.allclose(P, Q, atol=1e-6) and np.abs(P + P.T - 1).max() < 1e-6
