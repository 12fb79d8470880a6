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
