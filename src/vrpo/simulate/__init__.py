"""The statistical testbed: a finite contextual bandit with exact truth (docs/testbed.md).

``vrpo reproduce bandit`` runs it (``vrpo.simulate.reproduce``)."""
