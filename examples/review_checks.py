"""Rubrics for `vrpo gate` on movie-review prompts: a user's own checks, as a plain function.

``vrpo gate --rubrics examples/review_checks.py:rubrics`` calls it once per policy with all
prompts, that policy's responses and each prompt's slice (the `slice` column of --data;
``all`` where a row has none). It returns one dict per prompt: rubric name -> True (pass),
False (fail) or None (the rubric does not apply to this prompt).
"""

SPOILERS = ("ending", "dies", "twist", "killer")


def rubrics(prompts, responses, slices):
    return [{
        "short": len(response.split()) <= 16,         # a one-sentence review
        "not_empty": bool(response.strip()),
        # only the `story` slice is at risk of giving the plot away
        "no_spoiler": (not any(w in response.lower() for w in SPOILERS)) if slice_name == "story" else None,
    } for response, slice_name in zip(responses, slices)]
