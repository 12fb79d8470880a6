"""vrpo.sequences: the packed layouts (hand-checked), log-probs through the LM head chunk by
chunk (equal to full logits and to an unpadded loop, for tied, untied, biased and soft-capped
heads), and shared-prompt rows (equal to plain rows on GPT-2 and a Llama-architecture model,
with sdpa and eager attention; refused where the mask is not honoured)."""
import random

import pytest
import torch

from vrpo import losses
from vrpo.errors import UserError
from vrpo.sequences import (
    block_attention_mask, check_shared_prompt, lm_head_for_chunks, model_inputs, pack_rows, plain_rows, row_chunks,
    sequence_logps, sequence_scores,
)

VOCAB = 300


def gpt2(impl="sdpa", **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                     eos_token_id=0, attn_implementation=impl, **kw)
    return GPT2LMHeadModel(cfg).eval()


def llama(impl="sdpa", **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, attn_implementation=impl, **kw)
    return LlamaForCausalLM(cfg).eval()


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                       final_logit_softcapping=0.5, attn_implementation="eager", pad_token_id=0, bos_token_id=0,
                       eos_token_id=0)
    return Gemma2ForCausalLM(cfg).eval()


def random_rows(num_prompts=3, per_prompt=4, seed=0, tails=True, empty_prompt=False):
    """Rows of (s, prompt, completion): prompts of 0-8 tokens, some sequences with 1-2 more prompt
    tokens of their own (a tail), completions of 1-6 tokens; no token is the pad id 0."""
    rnd = random.Random(seed)
    ids = lambda n: [rnd.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    rows, s = [], 0
    for b in range(num_prompts):
        prompt = [] if (empty_prompt and b == 0) else ids(rnd.randrange(1, 9))
        items = []
        for j in range(per_prompt):
            tail = ids(rnd.randrange(1, 3)) if tails and j >= 2 else []
            items.append((s, prompt + tail, ids(rnd.randrange(1, 7))))
            s += 1
        rows.append(items)
    return rows


def loop_logps(model, prompt, completion):
    """Independent: one unpadded forward per sequence, float64 log-softmax, a Python loop."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(max(len(prompt), 1), ids.shape[1]))


def test_pack_rows_layout_by_hand():
    """prompt [5, 6], completions [7, 8] and (tail [9], completion [10]); pad 0."""
    batch = pack_rows([[(1, [5, 6], [7, 8]), (0, [5, 6, 9], [10])]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3]]  # restart after the prompt
    assert batch["token_sequence"].tolist() == [[-1, -1, 1, 1, -1, 0]]  # the tail is prompt: not counted
    assert batch["token_source"].tolist() == [[-1, -1, 1, 2, 1, 4]]  # first tokens predicted by the prompt's end
    assert batch["sequence_row"].tolist() == [0, 0] and batch["sequence_segment"].tolist() == [2, 1]
    assert batch["sequence_last"].tolist() == [5, 3]
    mask = block_attention_mask(batch["segment_ids"])[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]]
    plain = pack_rows([[(0, [5], [7, 0])], [(1, [], [8, 9])]], pad_token_id=0)
    assert "segment_ids" not in plain and plain["input_ids"].tolist() == [[5, 7, 0], [8, 9, 0]]
    assert plain["token_sequence"].tolist() == [[-1, 0, 0], [-1, 1, -1]]  # position 0 never counts
    assert plain["sequence_last"].tolist() == [1, 1]  # the last non-pad token (a trailing pad/EOS is skipped)
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_row_chunks_keep_whole_rows_and_trim_padding():
    batch = pack_rows([[(0, [1, 2], [3])], [(1, [1], [3, 4, 5, 6])], [(2, [1], [2])]], pad_token_id=0)
    chunks = row_chunks(batch, 2)
    assert [c["sequence_ids"].tolist() for c in chunks] == [[0, 1], [2]]
    assert chunks[1]["input_ids"].tolist() == [[1, 2]]  # trimmed to its own length
    shared = pack_rows(random_rows(3, 4), 0)
    chunks = row_chunks(shared, 5)  # 4 sequences per row: one row per chunk
    assert [c["sequence_ids"].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(c["token_sequence"].max() == 3 for c in chunks)  # chunk-local sequence indices


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_chunked_head_equals_full_logits_and_an_independent_loop(build, monkeypatch):
    model = build()
    rows = random_rows(3, 3, tails=False, empty_prompt=True)
    batch = pack_rows([[it] for r in rows for it in r], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = losses.sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        import vrpo.sequences

        monkeypatch.setattr(vrpo.sequences, "LOGITS_BUDGET", 3 * VOCAB)  # 3 tokens per chunk: many chunks
        chunked = sequence_logps(model, batch)
    assert lm_head_for_chunks(model) is model.get_output_embeddings()
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    loop = torch.tensor([loop_logps(model, p, c) for r in rows for _, p, c in r], dtype=torch.float32)
    torch.testing.assert_close(chunked, loop, rtol=1e-6, atol=1e-5)


def test_biased_head_and_soft_capped_logits():
    """A head with a bias is applied as a module (bias included); a model that soft-caps its
    logits (Gemma 2) is detected and uses its own full logits, which differ from head(hidden)."""
    model = gpt2()
    model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    rows = random_rows(2, 2, tails=False)
    batch = pack_rows([[it] for r in rows for it in r], 0)
    loop = torch.tensor([loop_logps(model, p, c) for r in rows for _, p, c in r], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch), loop, rtol=1e-6, atol=1e-5)
    capped = gemma2()
    assert lm_head_for_chunks(capped) is None
    loop = torch.tensor([loop_logps(capped, p, c) for r in rows for _, p, c in r], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(capped, batch), loop, rtol=1e-6, atol=1e-5)
        import vrpo.sequences

        raw = vrpo.sequences.lm_head_for_chunks
        vrpo.sequences.lm_head_for_chunks = lambda m: capped.get_output_embeddings()
        try:  # the detection matters: head(hidden) alone is not this model's distribution
            assert (sequence_logps(capped, batch) - loop).abs().max() > 1e-2
        finally:
            vrpo.sequences.lm_head_for_chunks = raw


def test_chunked_head_gradients_equal_full_logits():
    model = gpt2().double()
    batch = pack_rows([[it] for r in random_rows(3, 3) for it in r], 0)
    weights = torch.linspace(-1, 1, batch["sequence_ids"].numel(), dtype=torch.float64)
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        import vrpo.sequences

        budget = vrpo.sequences.LOGITS_BUDGET
        vrpo.sequences.LOGITS_BUDGET = 4 * VOCAB
        try:
            (weights * sequence_logps(model, batch, chunked_head=chunked)).sum().backward()
        finally:
            vrpo.sequences.LOGITS_BUDGET = budget
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_shared_prompt_rows_equal_plain_rows(build, impl):
    """Per-sequence log-probs to 1e-5 and their gradients to 1e-5 relative; K = 2..8 completions
    per prompt, prompts with per-sequence tails and an empty prompt."""
    model = build(impl)
    for per_prompt in (4, 7, 10):
        rows = random_rows(3, per_prompt, seed=per_prompt, empty_prompt=per_prompt == 4)
        shared = pack_rows(rows, 0)
        plain = pack_rows([[it] for r in rows for it in r], 0)
        assert shared["input_ids"].numel() < plain["input_ids"].numel()
        weights = torch.randn(plain["sequence_ids"].numel(), generator=torch.Generator().manual_seed(1))
        values, grads = [], []
        for batch in (shared, plain):
            model.zero_grad()
            v = sequence_logps(model, batch)
            (weights * v).sum().backward()
            values.append(v.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-5)
        for g_shared, g_plain in zip(*grads):
            assert (g_shared - g_plain).abs().max() <= 1e-5 * g_plain.abs().max() + 1e-8


def test_shared_prompt_is_refused_where_the_mask_is_not_honoured():
    """A model whose forward drops the 4D mask and position ids gives other values: refused in
    one line; an attention implementation without 4D masks is refused before running."""
    base = gpt2()

    class IgnoresMask(type(base)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            return super().forward(input_ids=input_ids, **kw)

    model = IgnoresMask(base.config).eval()
    model.load_state_dict(base.state_dict())
    batch = pack_rows(random_rows(2, 3), 0)
    with pytest.raises(UserError, match=r"--share-prompt: IgnoresMask .* does not honour the 4D attention mask"):
        check_shared_prompt(model, batch, 0)
    check_shared_prompt(base, batch, 0)  # the real model passes
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match=r"attention implementation 'flash_attention_2'.*--no-share-prompt"):
        model_inputs(base, batch)


def test_plain_rows_unpack_a_shared_batch():
    rows = random_rows(2, 3, seed=3)
    shared = pack_rows(rows, 0)
    plain = pack_rows([[it] for r in rows for it in sorted(r)], 0)
    for key in ("input_ids", "token_sequence", "sequence_last"):
        assert plain_rows(shared, 0)[key].tolist() == plain[key].tolist(), key


@pytest.mark.parametrize("build", ["gpt2", "llama"])
def test_reward_model_scores_on_shared_rows_equal_the_models_own_pooling(build):
    """The score of each completion is read at its last non-pad token, where a plain row's
    pooling reads it, including completions that end in pad/EOS tokens."""
    from transformers import AutoModelForSequenceClassification

    causal = gpt2() if build == "gpt2" else llama()
    causal.config.pad_token_id = 0
    causal.config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(causal.config).eval()
    rows = random_rows(3, 4, seed=5)
    rows[0][1] = (rows[0][1][0], rows[0][1][1], rows[0][1][2] + [0])  # an EOS (= pad) at the end
    rows[1][0] = (rows[1][0][0], rows[1][0][1], [0])  # a completion of EOS alone: read at the prompt's end
    with torch.no_grad():
        shared = sequence_scores(model, pack_rows(rows, 0))
        plain = sequence_scores(model, pack_rows([[it] for r in rows for it in sorted(r)], 0))
        one_by_one = torch.stack([model(input_ids=torch.tensor([p + c])).logits[0, 0]
                                  for r in rows for _, p, c in sorted(r)])
    torch.testing.assert_close(plain, one_by_one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
