"""vrpo.data: loaders, the paper schema, validation messages, shared tokenisation."""
import json

import pytest

from vrpo.data import (from_paper_schema, load_preferences, load_prompts, prompt_id_of, sequence_batch,
                       tokenize_completions)

ROWS = [
    {"prompt": "Q: hi", "chosen": " good answer", "rejected": " bad", "aux_prob": 0.7},
    {"prompt": "Q: bye", "chosen": " yes", "rejected": " no", "aux_prob": 0.4, "slice": "s1"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "saved"])
def test_formats_give_the_same_records(tmp_path, fmt):
    from datasets import Dataset

    ds = Dataset.from_list([{k: r.get(k) for k in ("prompt", "chosen", "rejected", "aux_prob", "slice")} for r in ROWS])
    path = {"jsonl": lambda: _jsonl(tmp_path / "d.jsonl", ROWS),
            "parquet": lambda: (ds.to_parquet(tmp_path / "d.parquet"), tmp_path / "d.parquet")[1],
            "csv": lambda: (ds.to_csv(tmp_path / "d.csv", index=False), tmp_path / "d.csv")[1],
            "saved": lambda: (ds.save_to_disk(tmp_path / "saved"), tmp_path / "saved")[1]}[fmt]()
    out = load_preferences(path)
    assert out["prompt"] == ["Q: hi", "Q: bye"]
    assert out["chosen"] == [" good answer", " yes"]
    assert out["aux_prob"] == pytest.approx([0.7, 0.4])
    assert out["prompt_id"][0] == prompt_id_of("Q: hi")


def test_paper_schema_is_imported_and_antisymmetrised(tmp_path):
    row = {"prompt": "p", "chosen": " a", "rejected": " b", "a_1": " c", "a_2": " d",
           "chosen_preference": 0.8, "rejected_preference": 0.4, "a_1_preference": 0.6, "a_2_preference": 0.2}
    out = load_preferences(_jsonl(tmp_path / "p.jsonl", [row]))[0]
    assert out["aux_prob"] == pytest.approx((0.8 + 1 - 0.4) / 2)  # 0.7
    assert out["ref_samples"] == [" c", " d"]
    g12 = (0.6 + 1 - 0.2) / 2  # 0.7
    assert sum(out["ref_aux_prob"], []) == pytest.approx([0.5, g12, 1 - g12, 0.5])
    assert "a_1" not in out and from_paper_schema(row)["aux_prob"] == pytest.approx(0.7)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "a", "rejectd": "b"}], "missing column 'rejected' (found 'rejectd': misnamed?)"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "  ", "rejected": "b"}],
     "row 1 column 'chosen': empty response"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "aux_prob": float("nan")}], "row 0 column 'aux_prob'"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "aux_prob": 1.5}], "expected a probability in [0, 1]"),
    ([{"prompt": "p", "chosen": 3, "rejected": "b"}], "row 0 column 'chosen': a int"),
])
def test_bad_input_one_line_error_naming_file_row_column(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r).replace("NaN", "NaN") + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_path_and_bad_json_line(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_preferences(tmp_path / "x.jsonl")


def test_conversational_rows_use_the_chat_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    out = load_preferences(_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tok)[0]
    assert out["prompt"] == "<user>hi<assistant>"
    assert out["chosen"] == "<assistant>good"[len("<assistant>"):] or out["chosen"] == "good"
    with pytest.raises(ValueError, match="chat template"):
        tok.chat_template = None
        load_preferences(tmp_path / "c.jsonl", tokenizer=tok)


def test_load_prompts_dedups(tmp_path):
    rows = ROWS + [dict(ROWS[0], chosen=" other")]
    items = load_prompts(_jsonl(tmp_path / "d.jsonl", rows))
    assert [i["prompt"] for i in items] == ["Q: hi", "Q: bye"]


def test_tokenize_completions_eos_truncation_and_masks(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt_ids, (c1, c2) = tokenize_completions(tok, "The movie was", [" wonderful", " bad and boring"], max_length=64,
                                                max_prompt_length=32)
    assert tok.decode(prompt_ids + c1[:-1]) == "The movie was wonderful"
    assert c1[-1] == c2[-1] == tok.eos_token_id
    long_prompt = "The movie was " * 40
    with pytest.raises(ValueError, match="max_prompt_length 16"):
        tokenize_completions(tok, long_prompt, [" ok"], max_length=20, max_prompt_length=16, where="row 3")
    p, (c,) = tokenize_completions(tok, long_prompt, [" ok great"], max_length=20, max_prompt_length=16,
                                   prompt_truncation="left")
    assert len(p) == 16 and len(p) + len(c) <= 20
    batch = sequence_batch([prompt_ids, prompt_ids], [c1, c2], tok.pad_token_id)
    assert batch["completion_mask"].sum(1).tolist() == [len(c1), len(c2)]
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt_ids) + len(c1), len(prompt_ids) + len(c2)]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from tests.pipeline_helpers import tiny_model_dir

    return AutoTokenizer.from_pretrained(tiny_model_dir())


def test_completions_that_must_not_be_cut(tiny_tokenizer):
    with pytest.raises(ValueError, match="exceed max_length 8, which would change its stored log-prob"):
        tokenize_completions(tiny_tokenizer, "The movie", [" was wonderful and great and the acting"], max_length=8,
                             max_prompt_length=4, cut_completions=False, where="row 0")


# --------------------------------------------------------------------------- nothing silently wrong
def test_identical_pairs_are_dropped_and_counted_and_all_identical_refused():
    from vrpo.data import drop_identical_pairs

    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "same", "rejected": "same"}, {"chosen": "c", "rejected": "d"}]
    kept, dropped = drop_identical_pairs(rows, "d.jsonl")
    assert kept == [rows[0], rows[2]] and dropped == 1
    with pytest.raises(ValueError, match="every one of the 2 rows has chosen == rejected"):
        drop_identical_pairs([{"chosen": "x", "rejected": "x"}] * 2, "d.jsonl")


def test_empty_prompt_is_refused_naming_the_row(tmp_path, tiny_tokenizer):
    """With no prompt token the response's first token would be conditioned on nothing and
    never counted by sequence_logps: refused, not trained on."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "", "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        load_preferences(_jsonl(tmp_path / "e.jsonl", rows))
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        load_prompts(_jsonl(tmp_path / "e.jsonl", rows))
    with pytest.raises(ValueError, match="row 7: the prompt gives no token of its own"):
        tokenize_completions(tiny_tokenizer, "", [" ok"], where="row 7")


def test_reference_samples_of_another_prompt_with_the_same_id_are_refused():
    from vrpo.data import attach_reference_samples

    rows = [{"prompt_id": "1", "prompt": "Review: great film"}, {"prompt_id": "2", "prompt": "Review: bad film"}]
    table = [{"prompt_id": "1", "prompt": "Review: great film", "samples": ["a", "b"], "ref_logps": [-1.0, -2.0]},
             {"prompt_id": "2", "prompt": "Book me for Tuesday", "samples": ["c", "d"], "ref_logps": [-1.0, -2.0]}]
    with pytest.raises(ValueError, match=r"--samples S: data row 1 \(prompt_id '2'\): the samples were drawn for "
                                         r"another prompt with this id"):
        attach_reference_samples(rows, table, "--samples S")
    table[1]["prompt"] = "Review: bad film"
    joined = attach_reference_samples(rows, table, "--samples S")
    assert joined[1]["ref_samples"] == ["c", "d"] and joined[1]["ref_truncated"] == [False, False]


def test_stored_reference_matrices_must_be_antisymmetric(tmp_path):
    """A position-biased judge (g(a, b) + g(b, a) != 1) breaks the mean-zero correction:
    refused, naming the row and the entries; within 1e-4 is accepted."""
    good = [[0.5, 0.7, 0.2], [0.3, 0.5, 0.6], [0.8, 0.4, 0.5]]
    biased = [[0.5, 0.7, 0.2], [0.45, 0.5, 0.6], [0.8, 0.4, 0.5]]  # 0.7 + 0.45 = 1.15
    diagonal = [[0.6, 0.5], [0.5, 0.5]]
    base = {"prompt": "p", "chosen": "a", "rejected": "b", "aux_prob": 0.6, "ref_samples": ["x", "y", "z"]}
    nearly = [[0.5, 0.7 + 5e-5], [0.3, 0.5]]
    load_preferences(_jsonl(tmp_path / "g.jsonl", [dict(base, ref_aux_prob=good), dict(base, ref_aux_prob=nearly)]))
    with pytest.raises(ValueError, match=r"row 1: ref_aux_prob is not antisymmetric \(\[0\]\[1\] \+ \[1\]\[0\] = 0.7 "
                                         r"\+ 0.45 = 1.15, expected 1"):
        load_preferences(_jsonl(tmp_path / "b.jsonl", [dict(base, ref_aux_prob=good), dict(base, ref_aux_prob=biased)]))
    with pytest.raises(ValueError, match=r"row 0: ref_aux_prob is not antisymmetric \(diagonal \[0\]\[0\] is 0.6"):
        load_preferences(_jsonl(tmp_path / "d.jsonl", [dict(base, ref_aux_prob=diagonal)]))


def test_truncated_samples_get_no_eos(tiny_tokenizer):
    """A reference sample the sampler cut at its length limit never drew EOS; one that
    ended drew it. Per-completion flags say which."""
    p, (ended, cut) = tokenize_completions(tiny_tokenizer, "The movie", [" was great", " was great"],
                                           add_eos=[True, False])
    assert ended == cut + [tiny_tokenizer.eos_token_id]


def test_negative_row_limits_are_refused_not_sliced(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=f"--max-rows {bad}: expected a positive integer"):
            load_preferences(path, max_rows=bad)
        with pytest.raises(ValueError, match=f"--max-prompts {bad}: expected a positive integer"):
            load_prompts(path, max_rows=bad)


def test_the_chat_template_message_names_no_flag(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError) as e:
        load_preferences(_jsonl(tmp_path / "c.jsonl", rows))
    assert "chat template" in str(e.value) and "--" not in str(e.value).split(": row 0")[1]
