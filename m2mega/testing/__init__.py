"""Test fixtures shipped with the package (tests, benchmarks and the docs' examples use them): the tiny GPT
stand-in family and its synthetic token task (:mod:`.tiny_gpt`, ``model.family: gpt`` /
``data.source: synthetic``), and small JSONL datasets in the input schema (:mod:`.sample_files`). Nothing
in the product imports this package."""
