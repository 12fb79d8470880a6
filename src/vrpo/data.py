"""Preference data in one canonical form, and the tokenisation every stage shares.

Canonical record (``load_preferences`` returns a ``datasets.Dataset`` of these):

- ``prompt``, ``chosen``, ``rejected``: strings. Conversational message lists are rendered
  with the chat template of the reference model's tokenizer (``chat_template_source``): the
  prompt with the generation prompt appended, each response as the text that the template
  adds after the prompt, in the form a reference sample of it has (``completion_text``: up
  to the end-of-sequence token, which tokenisation appends once, without special tokens;
  docs/pipeline.md, "How an observed reply ends"). Such rows also get ``aux_chosen`` /
  ``aux_rejected``: the reply as plain text (the assistant messages' content), what
  auxiliary models, judges and rubrics see (``aux_texts``; docs/pipeline.md, "What the
  auxiliary model sees").
- ``prompt_id``: string; given, or the first 16 hex digits of sha256(prompt).
- optional ``aux_prob`` (g(x, y+, y-) in [0, 1]), ``slice``, and any other column (kept).
- the paper code's schema (``a_1``, ``a_2``, ``chosen_preference``, ``rejected_preference``,
  ``a_1_preference``, ``a_2_preference``) is imported as ``aux_prob``, ``ref_samples`` = [a_1, a_2]
  and ``ref_aux_prob`` = [[.5, g12], [g21, .5]], each antisymmetrised.

Tokenisation (``tokenize_completions``) is the single definition of "the token sequence
of response y to prompt x" used by sampling (reference log-probs), training and reward
models, so log-probs computed at one stage match those of another. Truncation policy:
the prompt must fit ``max_prompt_length`` tokens, else a ValueError names the row
(``prompt_truncation="left"`` instead keeps the prompt's last tokens); a completion is cut
on the right so that prompt + completion fit ``max_length`` (the EOS token is then lost).
An empty prompt is refused: the first response token would be conditioned on nothing and
never counted in the sequence's log-prob.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
PAPER_COLUMNS = ("a_1", "a_2", "chosen_preference", "rejected_preference", "a_1_preference", "a_2_preference")
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

__all__ = [
    "load_preferences", "load_prompts", "attach_reference_samples", "check_same_prompt", "check_reference_matrix",
    "drop_identical_pairs", "read_rows", "prompt_id_of", "from_paper_schema", "check_probability_column",
    "tokenize_completions", "pad_right", "sequence_batch", "REQUIRED_COLUMNS", "PAPER_COLUMNS",
    "ChatTemplateSource", "chat_template_source", "tokenizer_identity", "aux_texts", "AUX_TEXT_COLUMNS",
    "completion_text",
]


# --------------------------------------------------------------------------------------
# Reading files into a list of row dicts (so errors can name the row)
# --------------------------------------------------------------------------------------
def read_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet / CSV file or a ``save_to_disk`` folder, as dicts."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory; expected a JSONL, Parquet or CSV file or a saved datasets folder")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(DATA_SUFFIXES)} or a saved datasets folder")
    return {"json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](path)


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: invalid JSON ({e.msg}); expected one JSON object per line") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: a {type(row).__name__}, expected a JSON object with prompt/chosen/rejected")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [dict(r) for r in csv.DictReader(fh)]
    for row in rows:  # CSV cells are text: numbers and JSON lists come back typed
        for key, value in row.items():
            if key in ("aux_prob",) + PAPER_COLUMNS[2:] and value not in (None, ""):
                try:
                    row[key] = float(value)
                except ValueError:
                    pass
            elif isinstance(value, str) and value[:1] == "[" and key in ("prompt", "chosen", "rejected", "ref_samples", "ref_aux_prob"):
                try:
                    row[key] = json.loads(value)
                except json.JSONDecodeError:
                    pass
    return rows


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: a folder but not a saved datasets folder (no dataset_info.json / dataset_dict.json)") from None
    if isinstance(ds, DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise ValueError(f"{path}: split {name!r} not found; available splits {sorted(ds)}")
        ds = ds[name]
    return ds.to_list()


# --------------------------------------------------------------------------------------
# Canonical records
# --------------------------------------------------------------------------------------
def prompt_id_of(prompt: str) -> str:
    """Default prompt id: the first 16 hex digits of sha256 of the prompt text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _check_columns(rows: list[dict], source: str, required: Sequence[str]) -> None:
    if not rows:
        raise ValueError(f"{source}: no rows; expected at least one preference record")
    present = set(rows[0])
    missing = [c for c in required if c not in present]
    if missing:
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, sorted(present), n=1, cutoff=0.6)
            hints.append(f"{col!r}" + (f" (found {close[0]!r}: misnamed?)" if close else ""))
        raise ValueError(f"{source}: missing column {', '.join(hints)}; found columns {sorted(present)}; "
                         f"expected {list(required)} (or the paper schema {list(PAPER_COLUMNS)})")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render_chat(row: dict, tokenizer, source: str, i: int) -> dict:
    """Render a conversational row: prompt with the generation prompt; each response as the
    text the chat template appends after that prompt, in a reference sample's form
    (``_reply_as_sampled``), and its reply as plain text (``aux_chosen`` / ``aux_rejected``)
    for the auxiliary model."""
    tokenizer = _chat_tokenizer(tokenizer, f"{source}: row {i}")
    prompt_msgs = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    out = dict(row, prompt=prompt)
    for col in ("chosen", "rejected"):
        resp = row[col]
        out[AUX_TEXT_COLUMNS[col]] = _reply_text(resp)
        if isinstance(resp, list):
            full = tokenizer.apply_chat_template(prompt_msgs + resp, tokenize=False)
            if not full.startswith(prompt):
                raise ValueError(f"{source}: row {i} column {col!r}: the chat template does not render the prompt "
                                 "as a prefix of prompt + response; pass plain strings instead")
            resp = _reply_as_sampled(tokenizer, full[len(prompt):], f"{source}: row {i} column {col!r}")
        out[col] = resp
    return out


def completion_text(tokenizer, ids: Sequence[int]) -> str:
    """The text a reference sample keeps of the completion token ids drawn after a prompt:
    the ids before the first end-of-sequence token, decoded without special tokens. The EOS
    itself is not text: ``tokenize_completions`` appends it again as one token."""
    ids = list(ids)
    eos = tokenizer.eos_token_id
    stop = ids.index(eos) if eos is not None and eos in ids else len(ids)
    return tokenizer.decode(ids[:stop], skip_special_tokens=True)


def _reply_as_sampled(tokenizer, rendered: str, where: str) -> str:
    """An observed reply, as rendered by the chat template after the prompt, in the form a
    sample of pi_ref has, so that labelled pairs and reference samples are draws of the same
    kind (the control variate's mean-zero premise): the template's turn usually ends with
    the EOS token's text (``<|im_end|>``, ``<|endoftext|>``) and a newline; the sampler
    stops at the EOS token and never draws that newline, and tokenisation appends the EOS
    once. Hence: ``completion_text`` of the reply's tokens. A reply that goes on after the
    EOS (more than one turn) is not something pi_ref can draw: a one-line error."""
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        after = tokenizer.decode(ids[ids.index(eos) + 1:], skip_special_tokens=True)
        if after.strip():
            raise ValueError(f"{where}: the rendered reply goes on after the end-of-sequence token "
                             f"{tokenizer.eos_token!r} ({_short(after)!r}); a sample of the reference model stops "
                             "there, so give the response as one assistant turn")
    return completion_text(tokenizer, ids)


def _check_text(row: dict, col: str, source: str, i: int) -> None:
    value = row.get(col)
    if not isinstance(value, str):
        raise ValueError(f"{source}: row {i} column {col!r}: a {type(value).__name__}, expected a string or a list of messages")
    if col == "prompt" and not value:
        raise ValueError(f"{source}: row {i}: empty prompt; expected text (with no prompt the response's first token "
                         "has nothing to be conditioned on, and its log-prob would not be counted)")
    if col != "prompt" and not value.strip():
        raise ValueError(f"{source}: row {i} column {col!r}: empty response; expected non-empty text")


REFERENCE_MATRIX_TOLERANCE = 1e-4  # |g(a, b) + g(b, a) - 1| allowed in a stored reference matrix


def check_reference_matrix(matrix, where: str, tolerance: float = REFERENCE_MATRIX_TOLERANCE) -> None:
    """A stored ``ref_aux_prob`` matrix must be antisymmetric: [j][k] + [k][j] = 1, diagonal 1/2.

    VRPO's correction has mean zero only for an antisymmetric g; a raw judge's scores that
    favour the first position (g(a, b) + g(b, a) > 1) silently bias the gradient."""
    n = len(matrix)
    for j in range(n):
        if len(matrix[j]) != n:
            raise ValueError(f"{where}: ref_aux_prob row {j} has {len(matrix[j])} entries; expected a {n} x {n} matrix")
    for j in range(n):
        for k in range(j, n):
            a, b = float(matrix[j][k]), float(matrix[k][j])
            if not abs(a + b - 1.0) <= tolerance:
                what = f"diagonal [{j}][{j}] is {a:.6g}, expected 1/2" if j == k else \
                    f"[{j}][{k}] + [{k}][{j}] = {a:.6g} + {b:.6g} = {a + b:.6g}, expected 1"
                raise ValueError(f"{where}: ref_aux_prob is not antisymmetric ({what}, within {tolerance:g}); "
                                 "g(x, a, b) + g(x, b, a) must be 1 (score with `vrpo score`, which antisymmetrises "
                                 "every model)")


def check_probability_column(values: Iterable, column: str, source: str) -> list[float]:
    """Floats in [0, 1] or a ValueError naming the first bad row."""
    out = []
    for i, v in enumerate(values):
        try:
            p = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: row {i} column {column!r}: {v!r} is not a number; expected a probability in [0, 1]") from None
        if math.isnan(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{source}: row {i} column {column!r}: {p}; expected a probability in [0, 1] (no NaN)")
        out.append(p)
    return out


def from_paper_schema(row: dict) -> dict:
    """Map one row of the paper code's schema to the canonical one (probabilities
    antisymmetrised: g_sym(a, b) = (g(a, b) + 1 - g(b, a)) / 2)."""
    cp, rp = float(row["chosen_preference"]), float(row["rejected_preference"])
    p1, p2 = float(row["a_1_preference"]), float(row["a_2_preference"])
    g12 = 0.5 * (p1 + 1.0 - p2)
    out = {k: v for k, v in row.items() if k not in PAPER_COLUMNS}
    out["aux_prob"] = 0.5 * (cp + 1.0 - rp)
    out["ref_samples"] = [row["a_1"], row["a_2"]]
    out["ref_aux_prob"] = [[0.5, g12], [1.0 - g12, 0.5]]
    return out


def load_preferences(path: str | Path, tokenizer=None, *, split: str | None = None, max_rows: int | None = None):
    """Load preference pairs from JSONL / JSON / Parquet / CSV / a saved ``datasets`` folder.

    Returns a ``datasets.Dataset`` with string columns prompt/chosen/rejected and prompt_id,
    plus every other column (``aux_prob`` checked to lie in [0, 1]). Raises a one-line
    ValueError naming the file, row and column of the first problem.
    """
    from datasets import Dataset

    from vrpo.cli_args import POSITIVE_INT

    source = str(path)
    POSITIVE_INT.check(max_rows, "--max-rows", allow_none=True)  # a negative slice would silently drop rows
    rows = read_rows(path, split)[:max_rows]
    paper = bool(rows) and all(c in rows[0] for c in PAPER_COLUMNS)
    _check_columns(rows, source, REQUIRED_COLUMNS + (PAPER_COLUMNS if paper else ()))
    canonical = []
    for i, row in enumerate(rows):
        if paper:
            check_probability_column([row[c] for c in PAPER_COLUMNS[2:]], f"paper-schema preference (row {i})", source)
            row = from_paper_schema(row)
        if any(_is_messages(row.get(c)) for c in REQUIRED_COLUMNS):
            row = _render_chat(row, tokenizer, source, i)
        for col in REQUIRED_COLUMNS:
            _check_text(row, col, source, i)
        row = dict(row)
        if row.get("prompt_id") in (None, ""):
            row["prompt_id"] = prompt_id_of(row["prompt"])
        row["prompt_id"] = str(row["prompt_id"])
        canonical.append(row)
    if "aux_prob" in canonical[0]:
        probs = check_probability_column([r.get("aux_prob") for r in canonical], "aux_prob", source)
        for r, p in zip(canonical, probs):
            r["aux_prob"] = p
    for i, r in enumerate(canonical):
        if r.get("ref_aux_prob") is not None:
            check_probability_column([p for row in r["ref_aux_prob"] for p in row], f"ref_aux_prob (row {i})", source)
            check_reference_matrix(r["ref_aux_prob"], f"{source}: row {i}")
    return Dataset.from_list(canonical)


def drop_identical_pairs(rows: list[dict], source: str) -> tuple[list[dict], int]:
    """Rows whose chosen and rejected responses differ, and how many were dropped.

    A pair with chosen == rejected carries no preference: its margin is 0 whatever the
    model, so only the reference term of VRPO would move the model. All rows identical is
    an error (nothing to learn from)."""
    kept = [r for r in rows if r["chosen"] != r["rejected"]]
    if not kept:
        raise ValueError(f"{source}: every one of the {len(rows)} rows has chosen == rejected; expected pairs of two "
                         "different responses (identical ones carry no preference)")
    return kept, len(rows) - len(kept)


def load_prompts(path: str | Path, tokenizer=None, *, split: str | None = None, max_rows: int | None = None) -> list[dict]:
    """Distinct prompts (``prompt_id``, ``prompt``) in first-seen order, from a prompts-only
    file (a ``prompt`` column) or a preference file. Message-list prompts are rendered with
    the chat template (generation prompt appended). A prompt whose rows have a ``slice``
    keeps the first one (``vrpo gate`` reports by slice)."""
    from vrpo.cli_args import POSITIVE_INT

    source = str(path)
    POSITIVE_INT.check(max_rows, "--max-prompts", allow_none=True)  # a negative slice would silently drop prompts
    rows = read_rows(path, split)
    _check_columns(rows, source, ("prompt",))
    seen: dict[str, str] = {}
    slices: dict[str, str] = {}
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if _is_messages(prompt) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            prompt = _render_chat({"prompt": prompt, "chosen": "", "rejected": ""}, tokenizer, source, i)["prompt"]
        _check_text({"prompt": prompt}, "prompt", source, i)
        pid = str(row.get("prompt_id") or prompt_id_of(prompt))
        if pid in seen and seen[pid] != prompt:
            raise ValueError(f"{source}: row {i}: prompt_id {pid!r} is used for two different prompts")
        seen.setdefault(pid, prompt)
        if row.get("slice") not in (None, ""):
            slices.setdefault(pid, str(row["slice"]))
    items = [{"prompt_id": k, "prompt": v, **({"slice": slices[k]} if k in slices else {})} for k, v in seen.items()]
    return items[:max_rows]


def attach_reference_samples(rows: list[dict], table: list[dict], source: str) -> list[dict]:
    """Join the rows of a ``vrpo sample`` table (prompt_id, prompt, samples, ref_logps,
    truncated) onto preference rows by prompt_id. The prompt text must be the same on both
    sides (an id reused for another prompt would attach samples of the wrong prompt). Rows
    that already hold ``ref_samples`` must agree. ``ref_truncated`` tells which samples hit
    the length limit without EOS (they are tokenised without one)."""
    by_id = {str(r["prompt_id"]): r for r in table}
    out = []
    for i, row in enumerate(rows):
        pid = str(row["prompt_id"])
        if pid not in by_id:
            raise ValueError(f"{source}: no reference samples for prompt_id {pid!r} (data row {i}); "
                             "sample the same prompts with `vrpo sample --prompts DATA`")
        sampled = by_id[pid]
        check_same_prompt(row["prompt"], sampled["prompt"], f"{source}: data row {i} (prompt_id {pid!r})")
        if row.get("ref_samples") is not None and list(row["ref_samples"]) != list(sampled["samples"]):
            raise ValueError(f"{source}: data row {i} (prompt_id {pid!r}) holds ref_samples that differ from the "
                             "samples folder; pass the samples the data was scored with")
        k = len(sampled["samples"])
        out.append(dict(row, ref_samples=list(sampled["samples"]), ref_logps=list(sampled["ref_logps"]),
                        ref_truncated=list(sampled.get("truncated") or [False] * k)))
    return out


def check_same_prompt(data_prompt: str, sampled_prompt: str, where: str) -> None:
    """One line when a join by prompt_id met two different prompt texts."""
    if data_prompt != sampled_prompt:
        raise ValueError(f"{where}: the samples were drawn for another prompt with this id ({_short(sampled_prompt)!r}, "
                         f"the data has {_short(data_prompt)!r}); prompt ids must name one prompt text")


def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------
# Which tokenizer renders conversational rows, and what text the auxiliary model sees
# --------------------------------------------------------------------------------------
# The chat template is the REFERENCE model's: prompt ids are hashes of the rendered prompt,
# so `score`, `fit-aux`, `audit`, `train-rm` and `gate` must render exactly as `vrpo sample`
# and `vrpo train` did, or the rows would not join the reference samples.
AUX_TEXT_COLUMNS = {"chosen": "aux_chosen", "rejected": "aux_rejected"}
NO_TEMPLATE_HINT = "pass --tokenizer MODEL_DIR (the reference model's folder; its chat template renders them)"


class ChatTemplateSource:
    """The tokenizer whose chat template renders message-list rows, loaded the first time a
    conversational row needs it (plain-string data never loads a tokenizer).

    ``path``: a local model or tokenizer folder, or None (then conversational rows are an
    error that says ``hint``); ``origin``: where the path came from, for error messages;
    ``expected_fingerprint``: the tokenizer fingerprint the samples' manifest recorded."""

    def __init__(self, path: str | Path | None, origin: str, hint: str = NO_TEMPLATE_HINT,
                 expected_fingerprint: str | None = None):
        self.path, self.origin, self.hint = (str(path) if path else None), origin, hint
        self.expected_fingerprint = expected_fingerprint
        self._tokenizer = None

    def get(self, where: str):
        if self._tokenizer is None:
            self._tokenizer = self._load(where)
        return self._tokenizer

    def _load(self, where: str):
        from transformers import AutoTokenizer

        from vrpo.errors import UserError

        if self.path is None:
            raise UserError(f"{where}: conversational messages need the reference model's chat template; {self.hint}")
        if not Path(self.path).is_dir():
            raise UserError(f"{self.origin} {self.path}: not a local model folder (nothing is downloaded); "
                            f"{NO_TEMPLATE_HINT}")
        if self.expected_fingerprint is not None:
            from vrpo.provenance import fingerprint_tokenizer

            if fingerprint_tokenizer(self.path) != self.expected_fingerprint:
                raise UserError(f"{self.origin} {self.path}: another tokenizer than the one the reference samples were "
                                "drawn with (fingerprints differ); its chat template would render other prompts")
        return AutoTokenizer.from_pretrained(self.path)


def chat_template_source(*, tokenizer: str | None = None, samples: str | None = None,
                         tokenizer_flag: str = "--tokenizer") -> ChatTemplateSource:
    """Which tokenizer renders the conversational rows of a command: ``tokenizer`` (a flag
    naming the reference model's folder) when given, else the model named by the manifest of
    ``samples`` (``vrpo sample`` records it), else none (plain-string data needs none).
    With both, the tokenizer must be the one the samples were drawn with."""
    if samples is None:
        return ChatTemplateSource(tokenizer, tokenizer_flag,
                                  hint=NO_TEMPLATE_HINT.replace("--tokenizer", tokenizer_flag))
    from vrpo.provenance import read_manifest

    manifest = read_manifest(samples)
    if tokenizer is not None:
        return ChatTemplateSource(tokenizer, tokenizer_flag, expected_fingerprint=manifest.get("tokenizer_fingerprint"))
    return ChatTemplateSource(manifest.get("model"), f"the reference model of --samples {samples}",
                              hint=f"the manifest of --samples {samples} names no model; {NO_TEMPLATE_HINT}")


def tokenizer_identity(path: str | Path | None) -> str | None:
    """The fingerprint of a ``--tokenizer`` folder for an output folder's reuse record (it
    decides how conversational rows render, hence their prompt ids), or None when none is given."""
    if not path:
        return None
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_tokenizer

    return fingerprint_tokenizer(check_readable(path, "--tokenizer", "the reference model's folder"))


def _chat_tokenizer(tokenizer, where: str):
    """A tokenizer with a chat template, from a tokenizer object or a ``ChatTemplateSource``."""
    origin = "the tokenizer"
    if isinstance(tokenizer, ChatTemplateSource):
        origin = f"the tokenizer of {tokenizer.path}"
        tokenizer = tokenizer.get(where)
    elif tokenizer is None:
        raise ValueError(f"{where}: conversational messages need the reference model's chat template, and this "
                         "step was given no tokenizer; give prompt/chosen/rejected as plain text")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: conversational messages need a chat template, and {origin} has none; "
                         "pass the reference model's folder, or plain strings")
    return tokenizer


def _reply_text(response) -> str:
    """A response as plain text: a string as it is; a message list as the content of its
    assistant messages (all messages when none is marked assistant), joined by newlines."""
    if not isinstance(response, list):
        return response
    said = [m for m in response if isinstance(m, dict) and m.get("role") == "assistant"] or response
    return "\n".join(str(m.get("content", "")) for m in said if isinstance(m, dict))


def aux_texts(rows) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected) as auxiliary models, judges and rubrics see them, from
    canonical rows (a list of dicts or a ``datasets.Dataset``): the prompt as the reference
    model sees it (rendered, for conversational rows) and each reply as plain text (the
    ``aux_chosen`` / ``aux_rejected`` columns where ``load_preferences`` set them). A
    reference sample is plain text already (decoded without special tokens), so observed and
    reference pairs reach g in the same form."""
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)

    def column(col: str) -> list[str]:
        aux = AUX_TEXT_COLUMNS[col]
        return [r[aux] if isinstance(r.get(aux), str) else r[col] for r in rows]

    return [r["prompt"] for r in rows], column("chosen"), column("rejected")


# --------------------------------------------------------------------------------------
# Tokenisation shared by sampling, training and reward models
# --------------------------------------------------------------------------------------
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_completions(tokenizer, prompt: str, completions: Sequence[str], *, max_length: int = 512,
                         max_prompt_length: int = 256, prompt_truncation: str = "error",
                         add_eos: bool | Sequence[bool] = True,
                         where: str = "prompt", cut_completions: bool = True) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of each completion after it.

    Each completion is tokenised together with the prompt (tokens may merge across the
    boundary); the completion starts where it leaves the tokenised prompt, so the prompt
    part is shared by all completions. ``add_eos`` appends the EOS token (the model must
    learn to stop): one flag for all completions, or one per completion (a reference sample
    cut at the sampler's length limit never drew EOS, so it gets none). Truncation: see the module docstring; ``cut_completions=False`` makes a
    completion that does not fit an error instead (its stored log-prob would not match).
    ``where`` names the row in errors.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = [tokenizer(prompt + c, add_special_tokens=False)["input_ids"] for c in completions]
    cut = min([len(prompt_ids)] + [_common_prefix(prompt_ids, f) for f in full])
    prompt_part, completion_parts = prompt_ids[:cut], [f[cut:] for f in full]
    if not prompt_part:  # the first response token would have no context, and sequence_logps never counts it
        raise ValueError(f"{where}: the prompt gives no token of its own (empty, or merged into the response's "
                         "first token); expected a prompt text")
    eos = [add_eos] * len(completion_parts) if isinstance(add_eos, bool) else list(add_eos)
    if len(eos) != len(completion_parts):
        raise ValueError(f"add_eos: {len(eos)} flags for {len(completion_parts)} completions")
    if tokenizer.eos_token_id is not None:
        completion_parts = [c + [tokenizer.eos_token_id] if e else c for c, e in zip(completion_parts, eos)]
    if len(prompt_part) > max_prompt_length:
        if prompt_truncation != "left":
            raise ValueError(f"{where}: prompt has {len(prompt_part)} tokens > max_prompt_length {max_prompt_length}; "
                             "raise --max-prompt-length or pass --prompt-truncation left")
        prompt_part = prompt_part[-max_prompt_length:]  # keep the end, nearest the response
    room = max_length - len(prompt_part)
    if not cut_completions and any(len(c) > room for c in completion_parts):
        longest = max(len(c) for c in completion_parts)
        raise ValueError(f"{where}: prompt ({len(prompt_part)} tokens) + a completion ({longest} tokens) exceed "
                         f"max_length {max_length}, which would change its stored log-prob; raise --max-length")
    return prompt_part, [c[:room] for c in completion_parts]


def pad_right(sequences: Sequence[Sequence[int]], value: int):
    """A [N, T] long tensor of the sequences padded on the right with ``value``."""
    import torch

    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def sequence_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_token_id: int):
    """Stack prompt + completion pairs into ``input_ids``, ``attention_mask`` and
    ``completion_mask`` [N, T] (right padding), the input of ``vrpo.losses.sequence_logps``."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
    input_ids = pad_right(seqs, pad_token_id)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    completion_mask = pad_right(masks, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
