"""A Parquet prompt file reads exactly as the Hugging Face dataset made from the same table (the multi-host feature
runs read JSONL and a dataset directory)."""

import datasets
import pandas as pd
from conftest import FEATURE_ROWS

from levanter_multihost.prompts import read_prompts


def test_a_parquet_file_reads_as_the_dataset_of_the_same_rows(tmp_path):
    frame = pd.DataFrame(FEATURE_ROWS)
    frame.to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "rows_dataset"))
    parquet = read_prompts(file=str(tmp_path / "rows.parquet"))
    dataset = read_prompts(dataset=str(tmp_path / "rows_dataset"))
    assert vars(parquet) == vars(dataset)
    assert parquet.texts[0] == "12+30=" and parquet.messages[1] == [{"role": "user", "content": "7+5="}]
    assert parquet.overrides["max_new_tokens"][2] == 3 and parquet.overrides["n_generations"][4] == 3
