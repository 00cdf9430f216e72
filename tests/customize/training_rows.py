"""The training pairs a manifest gives, as one frame, for the tests that compare them whole (the job streams them:
``pipelines.train_customizer.TrainingPairRows`` and ``pair_dataset``)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipelines.train_customizer import REFERENCE_COLUMN, TrainingPairRows


def pair_rows(config) -> pd.DataFrame:
    """All of ``TrainingPairRows(config)`` as one frame (image, caption, ``REFERENCE_COLUMN``)."""
    tables = list(TrainingPairRows(config))
    if not tables:
        return pd.DataFrame(columns=[config.image_column, REFERENCE_COLUMN])
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()
