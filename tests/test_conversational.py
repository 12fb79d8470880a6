"""Conversational (TRL message-list) data through every command: the tiny model's chat
template, the one rule for which tokenizer renders the rows, the text the auxiliary model
sees, and the conversational quickstart end to end through the CLI."""
import json
from pathlib import Path

import pytest

from vrpo.cli import main
from vrpo.data import aux_texts, chat_template_source, load_preferences, load_prompts

EXAMPLES = Path(__file__).parents[1] / "examples"
CHAT = EXAMPLES / "quickstart_chat.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "tiny"
    assert main(["tiny-model", "--out", str(out), "--texts", str(CHAT)]) == 0
    return out


def test_tiny_model_has_a_chat_template_whose_prompt_prefixes_the_reply(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was the film?"}]
    reply = [{"role": "assistant", "content": "The film was great."}]
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + reply, tokenize=False)
    assert rendered == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHow was the film?<|endoftext|>\n<|assistant|>\n"
    assert full.startswith(rendered) and full[len(rendered):] == "The film was great.<|endoftext|>\n"
    assert tok.apply_chat_template(prompt, add_generation_prompt=True)  # token ids too


def test_conversational_row_renders_and_keeps_the_plain_reply_for_the_aux_model(tiny):
    rows = load_preferences(CHAT, chat_template_source(tokenizer=str(tiny))).to_list()
    first = json.loads(CHAT.read_text().splitlines()[0])
    assert rows[0]["prompt"].endswith("<|assistant|>\n") and first["prompt"][-1]["content"] in rows[0]["prompt"]
    # what the template appends ("...<|endoftext|>\n") in a reference sample's form: the EOS is appended as a token
    assert rows[0]["chosen"] == first["chosen"][0]["content"]
    prompts, chosen, rejected = aux_texts(rows)
    assert prompts[0] == rows[0]["prompt"]  # g sees the prompt as the model sees it
    assert (chosen[0], rejected[0]) == (first["chosen"][0]["content"], first["rejected"][0]["content"])
    # plain-string data is seen as it is
    plain = [{"prompt": "Review: x", "chosen": " good", "rejected": " bad"}]
    assert aux_texts(plain) == (["Review: x"], [" good"], [" bad"])


def test_the_reference_models_tokenizer_renders_the_rows(tiny, tmp_path):
    # no tokenizer: one line naming the row and the flag to pass
    with pytest.raises(ValueError, match=r"row 0: .*chat template.*--tokenizer"):
        load_preferences(CHAT, chat_template_source(tokenizer=None))
    # plain-string data never loads one
    assert len(load_preferences(EXAMPLES / "quickstart.jsonl", chat_template_source(tokenizer="/no/such/dir"))) == 24
    # from the samples' manifest (what `vrpo sample` records), and the same ids as sample's
    samples = tmp_path / "samples"
    samples.mkdir()
    from vrpo.provenance import fingerprint_tokenizer

    (samples / "manifest.json").write_text(json.dumps({"model": str(tiny), "tokenizer_fingerprint":
                                                       fingerprint_tokenizer(str(tiny))}))
    ids = [p["prompt_id"] for p in load_prompts(CHAT, chat_template_source(samples=str(samples)))]
    assert ids == list(load_preferences(CHAT, chat_template_source(tokenizer=str(tiny)))["prompt_id"])
    # --tokenizer beside --samples must be the samples' tokenizer
    other = tmp_path / "other"
    from vrpo.testing import build_tiny_causal_lm

    build_tiny_causal_lm(other, ["other texts entirely"], vocab_size=300)
    with pytest.raises(ValueError, match="another tokenizer than the one the reference samples"):
        load_preferences(CHAT, chat_template_source(tokenizer=str(other), samples=str(samples)))
    (samples / "manifest.json").write_text(json.dumps({"model": str(tmp_path / "moved")}))
    with pytest.raises(ValueError, match="not a local model folder.*--tokenizer"):
        load_preferences(CHAT, chat_template_source(samples=str(samples)))


# ---- an observed reply ends as a sampled one does: one EOS token, nothing after it
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# end of turn is a special token other than EOS (as in Gemma's template, whose EOS is another token)
OTHER_END = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
             "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _tokenizer(template: str, specials=(), eos=None):
    from vrpo.testing import build_tokenizer

    tok = build_tokenizer(["Hello there, how was the film?", "The film was great. Hello again."], vocab_size=300)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def _observed_and_sampled_ids(tok, tmp_path, content, sampled_text):
    """Token ids of the observed reply ``content`` (a conversational row, rendered by
    load_preferences) and of a reference sample whose stored text is ``sampled_text``, both
    as training and `vrpo sample` tokenise them (EOS appended)."""
    from vrpo.data import tokenize_completions

    row = {"prompt": [{"role": "user", "content": "How was the film?"}],
           "chosen": [{"role": "assistant", "content": content}], "rejected": [{"role": "assistant", "content": "No."}]}
    (tmp_path / "row.jsonl").write_text(json.dumps(row) + "\n")
    rendered = load_preferences(tmp_path / "row.jsonl", tok)[0]
    _, (observed,) = tokenize_completions(tok, rendered["prompt"], [rendered["chosen"]])
    _, (sampled,) = tokenize_completions(tok, rendered["prompt"], [sampled_text])
    return observed, sampled, rendered


@pytest.mark.parametrize("template, specials, eos", [
    (None, (), None),  # the tiny model's template: each turn ends with <|endoftext|> (its EOS) and a newline
    (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),  # ChatML, end of turn = EOS (Qwen, SmolLM2 instruct)
], ids=["tiny", "chatml"])
def test_an_observed_reply_and_a_sampled_reply_have_the_same_token_ids(tmp_path, template, specials, eos):
    from vrpo.testing import CHAT_TEMPLATE

    tok = _tokenizer(template or CHAT_TEMPLATE, specials, eos)
    observed, sampled, rendered = _observed_and_sampled_ids(tok, tmp_path, "Hello", "Hello")
    assert observed == sampled
    assert observed[-1] == tok.eos_token_id and tok.eos_token_id not in observed[:-1]  # one EOS, at the end
    assert rendered["chosen"] == "Hello" and rendered["aux_chosen"] == "Hello"


def test_an_end_of_turn_marker_other_than_eos_is_dropped_as_sampling_drops_it(tmp_path):
    """The template ends a turn with <end_of_turn> + newline, and EOS is another token. A draw
    of the same tokens followed by EOS is stored by `vrpo sample` as its text decoded without
    special tokens: the marker goes, the newline stays; the observed reply matches that."""
    from vrpo.data import tokenize_completions

    tok = _tokenizer(OTHER_END, ("<start_of_turn>", "<end_of_turn>"))
    drawn = tok("Hello<end_of_turn>\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stored = tok.decode(drawn[:drawn.index(tok.eos_token_id)], skip_special_tokens=True)  # as vrpo.sampling stores it
    observed, sampled, rendered = _observed_and_sampled_ids(tok, tmp_path, "Hello", stored)
    assert stored == "Hello\n" and rendered["chosen"] == "Hello\n" and observed == sampled
    assert observed == tokenize_completions(tok, rendered["prompt"], ["Hello\n"])[1][0]


def test_a_reply_that_goes_on_after_eos_is_one_line_error(tmp_path):
    from vrpo.testing import CHAT_TEMPLATE

    tok = _tokenizer(CHAT_TEMPLATE)
    row = {"prompt": "How was the film?", "rejected": "No.",
           "chosen": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}]}
    (tmp_path / "two.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"row 0 column 'chosen': the rendered reply goes on after the end-of-sequence"):
        load_preferences(tmp_path / "two.jsonl", tok)


@pytest.mark.slow
def test_conversational_quickstart_commands(tiny, tmp_path):
    """The plain quickstart's commands on message-list data (README), then fit-aux, audit and train-rm."""
    d = tmp_path
    assert main(["sample", "--model", str(tiny), "--prompts", str(CHAT), "--num-samples", "4", "--max-new-tokens", "12",
                 "--out", str(d / "samples")]) == 0
    # score renders with the model the samples' manifest names: no tokenizer flag needed
    assert main(["score", "--aux", f"{EXAMPLES / 'sentiment_aux.py'}:prefer_positive", "--data", str(CHAT),
                 "--samples", str(d / "samples"), "--out", str(d / "scored")]) == 0
    assert main(["train", "--method", "vrpo", "--model", str(tiny), "--data", str(d / "scored"), "--out",
                 str(d / "run"), "--max-steps", "2", "--per-device-train-batch-size", "4"]) == 0
    prov = (d / "run" / "manifests" / "provenance.json").read_text()
    assert '"stored_sample_logp_error": 0.0' in prov  # sampling and training rendered the same prompts
    import pyarrow.parquet as pq

    scored = pq.read_table(d / "scored" / "data.parquet").to_pylist()
    from vrpo.aux.base import load_callable

    prefer_positive = load_callable(f"{EXAMPLES / 'sentiment_aux.py'}:prefer_positive", "--aux")
    g = prefer_positive([], [scored[0]["aux_chosen"]], [scored[0]["aux_rejected"]])[0]
    assert scored[0]["aux_prob"] == pytest.approx(g)  # g saw the plain replies, not the template's markup
    # fit-aux and audit: no samples involved, so the reference model's folder is passed
    assert main(["fit-aux", "--data", str(CHAT), "--tokenizer", str(tiny), "--model", "gpm-minilm", "--folds", "2",
                 "--epochs", "3", "--out", str(d / "aux")]) == 0
    assert main(["audit", "--data", str(CHAT), "--tokenizer", str(tiny), "--aux", str(d / "aux"),
                 "--out", str(d / "audit")]) == 0
    assert "out-of-fold" in (d / "audit" / "audit.md").read_text()
    import pandas as pd

    audit = pd.read_csv(d / "audit" / "audit.csv")  # the rendered prompt, the plain replies
    assert audit["prompt"].str.endswith("<|assistant|>\n").all() and not audit["chosen"].str.contains("<|", regex=False).any()
    assert main(["train-rm", "--method", "bt", "--model", str(tiny), "--data", str(CHAT), "--out", str(d / "rm"),
                 "--max-steps", "1", "--per-device-train-batch-size", "4"]) == 0
    assert main(["train-rm", "--method", "vrpo", "--model", str(tiny), "--data", str(d / "scored"), "--out",
                 str(d / "rm-vrpo"), "--max-steps", "1", "--per-device-train-batch-size", "4"]) == 0
