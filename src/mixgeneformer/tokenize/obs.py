"""The obs metadata columns a corpus carries: their names, their Arrow types over every input, their values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import ConfigError

#: The columns of every corpus; an obs column carried along under one of these names would replace it.
CORPUS_COLUMNS = ("input_ids", "length", "species", "cell_index")


def _check_obs_names(obs_columns: Sequence[str]) -> None:
    """ConfigError for an obs column named like a column the corpus holds itself (CORPUS_COLUMNS)."""
    clash = [column for column in obs_columns if column in CORPUS_COLUMNS]
    if clash:
        raise ConfigError(
            f"obs column {clash[0]!r} has the name of a column every tokenized corpus holds itself "
            f"({', '.join(CORPUS_COLUMNS)}) and would replace it. To keep it, rename it in the input's obs (e.g. "
            f"adata.obs.rename(columns={{{clash[0]!r}: 'obs_{clash[0]}'}}), then write the file again) and pass the new "
            "name (--obs-columns); or leave it out."
        )


def _common_obs_types(per_input: Sequence[dict[str, pa.DataType]]) -> dict[str, pa.DataType]:
    """One Arrow type per obs column over every input: the inputs' own when they agree, float64 for
    integers in some and floats in others, else string (e.g. integer donors in one file, names in another)."""
    common = dict(per_input[0]) if per_input else {}
    for types in per_input[1:]:
        for column, arrow_type in types.items():
            if common[column] != arrow_type:
                numbers = {common[column], arrow_type} <= {pa.int64(), pa.float64()}
                common[column] = pa.float64() if numbers else pa.string()
    return common


#: pandas' inferred kinds of an object column that hold no bytes (any other kind, e.g. "mixed", may).
_WITHOUT_BYTES = frozenset({"empty", "string", "integer", "floating", "mixed-integer-float", "boolean", "decimal", "complex"})


def _obs_text(values: pd.Series) -> np.ndarray:
    """``str(value)`` of every value, None where missing (an object array); a categorical column's
    categories are converted once each."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = _obs_text(pd.Series(values.cat.categories))
        return np.append(categories, None)[values.cat.codes.to_numpy()]  # code -1 (missing) -> the None at the end
    data = values.astype(object)
    text = data.astype(str).to_numpy(dtype=object)
    if pd.api.types.infer_dtype(data, skipna=True) not in _WITHOUT_BYTES:
        is_bytes = data.map(type).isin([bytes, np.bytes_]).to_numpy()  # astype(str) decodes them; str() wrote b'...'
        text[is_bytes] = data[is_bytes].map(str).to_numpy(dtype=object)
    text[values.isna().to_numpy()] = None
    return text


def _obs_array(values: pd.Series, arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_string(arrow_type):
        return pa.array(_obs_text(values), type=pa.string())
    return pa.array(values.to_numpy(), type=arrow_type, from_pandas=True)


def _obs_arrow_types(source: Any, obs_columns: Sequence[str]) -> dict[str, pa.DataType]:
    frame = source.obs(list(obs_columns), 0, 0)
    types: dict[str, pa.DataType] = {}
    for column in obs_columns:
        dtype = frame[column].dtype
        if pd.api.types.is_bool_dtype(dtype):
            types[column] = pa.bool_()
        elif pd.api.types.is_integer_dtype(dtype):
            types[column] = pa.int64()
        elif pd.api.types.is_float_dtype(dtype):
            types[column] = pa.float64()
        else:
            types[column] = pa.string()
    return types
