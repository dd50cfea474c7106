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


def test_fractional_counts_error_does_not_claim_x_or_counts_layer_was_read() -> None:
    # The message began "expects raw counts in X or layers['counts']" whatever matrix was read (e.g.
    # `--layer counts` itself, or a .loom's matrix), which contradicts USAGE ("Counts are read from `X`
    # unless `--layer NAME`"): it now names the matrix read, and lists predict among the YAML users.
    import numpy as np
    import pytest
    import scipy.sparse as sp

    from mixgeneformer.errors import InputDataError
    from mixgeneformer.readers.base import validate_counts

    with pytest.raises(InputDataError) as info:
        validate_counts(sp.csr_matrix(np.array([[1.5, 0.0], [2.0, 1.0]])), where="cells.h5ad")
    message = str(info.value)
    assert "expects raw integer counts in the matrix read; found 1.5 at cell 0" in message
    assert "X or layers" not in message and "predict" in message


def test_coverage_line_gives_a_make_names_example_of_the_files_species() -> None:
    # `mixgf medians` / `tokenize` on the mouse Baron file printed "57 of them symbols with '.' for '-'
    # (R's make.names, e.g. HLA.A)": a human symbol, for a file that holds none (USAGE section 1 gives
    # H2.K1 as the mouse case).
    import numpy as np

    from mixgeneformer.genes import GeneMapping

    def line(species: str) -> str:
        ids = np.array(["ENSMUSG00000000001" if species == "mouse" else "ENSG00000000003"], dtype=object)
        return GeneMapping(ids, species, "symbol", n_dots_repaired=1).coverage_report()  # type: ignore[arg-type]

    assert "e.g. H2.K1" in line("mouse") and "HLA.A" not in line("mouse")
    assert "e.g. HLA.A" in line("human")


def test_existing_obsm_key_error_names_the_cli_option_for_another_key() -> None:
    # `mixgf embed` on an input already holding obsm['X_mixgeneformer'] said "or choose another key"
    # without naming --key (which the docs list only in --help); it now names it.
    import anndata as ad
    import numpy as np
    import pytest

    from mixgeneformer.embed.cells import _check_key
    from mixgeneformer.errors import ConfigError

    adata = ad.AnnData(np.zeros((2, 1), np.float32))
    adata.obsm["X_mixgeneformer"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ConfigError, match=r"--overwrite.*another key \(CLI: --key\)"):
        _check_key(adata, "X_mixgeneformer", overwrite=False)
    _check_key(adata, "X_other", overwrite=False)
