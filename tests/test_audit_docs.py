"""Audit of the user documentation (README.md, docs/USAGE.md, `mixgf --help`) against the code: regression
tests for the code faults it found (the doc-only fixes need none)."""

from __future__ import annotations

from mixgeneformer import diagnostics


def test_learning_verdict_states_a_loss_above_the_baseline_as_above() -> None:
    # `mixgf pretrain` printed "... is -0.02 nats below the rank-position baseline" for a model that had not
    # beaten it; USAGE section 4 promises the loss "beside the rank-position baseline", which a negative
    # "below" garbles.
    sentence, learned = diagnostics.learning_verdict({"mlm_loss": 9.511, "rank_unigram_loss": 9.489})
    assert not learned
    assert "0.02 nats above the rank-position baseline" in sentence
    assert "-0.02" not in sentence and "below" not in sentence.split(".")[0]
    sentence, learned = diagnostics.learning_verdict({"mlm_loss": 9.0, "rank_unigram_loss": 9.5})
    assert learned and "0.50 nats below the rank-position baseline" in sentence
